#!/usr/bin/env bash
# Runs every go fuzz target in the repository for a short time each
# (FUZZTIME, default 5s), after `go test` has run their seed corpora.
# Parsers of hostile input (guest frames, archives, Dockerfiles, QMP,
# tokens...) must not only pass their seeds but survive new inputs; a
# crash leaves its input under the package's testdata/fuzz for a test.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
fuzztime="${FUZZTIME:-5s}"
bindir="$(mktemp -d)"
log="$bindir/fuzz.log"
trap 'rm -rf "$bindir"' EXIT
cache="$(go env GOCACHE)/fuzz"
failed=0
count=0
built=""
while IFS= read -r line; do
	file="${line%%:*}"
	name="$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*)\(.*/\1/' <<<"${line#*:}")"
	dir="$(dirname "$file")"
	pkg="./$dir"
	bin="$bindir/$(tr / _ <<<"$dir").test"
	count=$((count + 1))
	# One instrumented test binary per package, linked once for all its
	# targets (go test -fuzz would link it again for each).
	if [ "$built" != "$bin" ]; then
		if ! go test -c -fuzz=. -o "$bin" "$pkg" >"$log" 2>&1; then
			echo "FAIL ${pkg}: building its fuzz binary:"
			tail -30 "$log"
			failed=1
			continue
		fi
		built="$bin"
	fi
	importpath="$(go list "$pkg")"
	# Go's fuzzing coordinator sometimes ends a run with "context deadline
	# exceeded" when -fuzztime runs out while a worker is busy; that is no
	# finding (a real one writes its failing input), so run it again.
	ok=0
	for attempt in 1 2 3; do
		if (cd "$root/$dir" && "$bin" -test.run='^$' -test.fuzz="^${name}\$" -test.fuzztime="$fuzztime" -test.parallel=2 \
			-test.fuzzcachedir="$cache/$importpath") >"$log" 2>&1; then
			ok=1
			break
		fi
		if grep -q 'Failing input written' "$log" || ! grep -q 'context deadline exceeded' "$log"; then
			break
		fi
		echo "     ${pkg} ${name}: the fuzzing harness timed out (attempt ${attempt}), no failing input; again"
	done
	if [ "$ok" = 0 ]; then
		echo "FAIL ${pkg} ${name}:"
		tail -30 "$log"
		failed=1
	else
		echo "ok   ${pkg} ${name} ($(grep -o 'execs: [0-9]*' "$log" | tail -1))"
	fi
done < <(grep -rE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' internal cmd test 2>/dev/null | sort)
echo "fuzzed ${count} targets for ${fuzztime} each"
exit "$failed"
