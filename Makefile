# kiln: the two entry points a newcomer needs are `make run` and `make test`
# (see README.md). Both set up the host first and are safe to repeat.
DATA_DIR ?= /var/lib/kiln
GO ?= go
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: setup build console run test check bench vet clean

CONSOLE := internal/console
CONSOLE_SRC := $(wildcard $(CONSOLE)/web/src/*) $(CONSOLE)/web/build.mjs

# VMs, network namespaces and nftables need root. A root shell (which on a
# minimal Debian has no sudo) runs the targets directly; anyone else gets
# the same make re-run under sudo, with Go's PATH kept.
# The fast checks: vet and the tests that need neither root nor VMs
# (`go test -short`: internal/testenv skips the others), as any user.
check:
	$(GO) vet ./...
	$(GO) test -short -count=1 ./...

ifneq ($(shell id -u),0)
GOALS := $(filter-out check,$(or $(MAKECMDGOALS),setup))
ifneq ($(GOALS),)
$(firstword $(GOALS)):
	@command -v sudo >/dev/null || { echo "make: kiln needs root: run this as root, or install sudo" >&2; exit 1; }
	sudo env "PATH=$(PATH)" $(MAKE) $(MAKECMDGOALS)
$(filter-out $(firstword $(GOALS)),$(GOALS)):
	@:
endif
else

setup:
	bash scripts/setup.sh --data-dir=$(DATA_DIR)
	$(GO) mod download

# The web console's assets, embedded into bin/kiln: npm ci only when the
# lockfile changed, the esbuild bundle only when a source changed.
$(CONSOLE)/web/node_modules/.package-lock.json: $(CONSOLE)/web/package-lock.json
	cd $(CONSOLE)/web && npm ci --no-audit --no-fund
	touch $@

$(CONSOLE)/dist/index.html: $(CONSOLE)/web/node_modules/.package-lock.json $(CONSOLE_SRC)
	cd $(CONSOLE)/web && npm run build --silent

console: $(CONSOLE)/dist/index.html

build: console
	$(GO) build -o bin/kiln ./cmd/kiln
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags='-s -w' -o bin/kiln-agent ./cmd/kiln-agent

run: setup build
	DATA_DIR=$(DATA_DIR) bash scripts/demo.sh

# -p 1: packages that boot VMs or change host networking run one at a
# time, so they neither starve each other nor touch each other's netns.
# -timeout is per package: the longest takes about 12 min under TCG, and a
# hung one then fails with its goroutines' stacks with time left for CI's
# other packages, instead of eating the whole run.
test: setup build
	$(GO) vet ./...
	$(GO) test -p 1 -count=1 -timeout 25m ./...
	bash scripts/fuzz.sh

bench: setup build
	bin/kiln --data-dir=$(DATA_DIR) bench engine

clean:
	rm -rf bin
	find $(CONSOLE)/dist -mindepth 1 ! -name README.md -delete
endif
