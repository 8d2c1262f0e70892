package dockerfile

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name   string
		src    string
		args   map[string]string
		check  func(t *testing.T, p *Plan)
		errHas string
	}{
		{
			name: "managed base aliases",
			src:  "FROM debian:12\nFROM debian:bookworm\nFROM Debian:Bookworm-Slim\n",
			check: func(t *testing.T, p *Plan) {
				for i, s := range p.Stages {
					if s.Base != (Base{Kind: BaseManaged, Ref: "debian-12"}) {
						t.Errorf("stage %d base = %+v", i, s.Base)
					}
				}
			},
		},
		{
			name: "scratch, archive and registry bases",
			src:  "FROM scratch\nFROM oci-archive:base/img.tar\nFROM docker-archive:d.tar\nFROM localhost:5000/app/base:1.0\nFROM registry.example.org/x@sha256:" + strings.Repeat("a", 64) + "\n",
			check: func(t *testing.T, p *Plan) {
				want := []Base{
					{Kind: BaseScratch},
					{Kind: BaseOCIArchive, Ref: "base/img.tar"},
					{Kind: BaseOCIArchive, Ref: "d.tar"},
					{Kind: BaseRegistry, Ref: "localhost:5000/app/base:1.0"},
					{Kind: BaseRegistry, Ref: "registry.example.org/x@sha256:" + strings.Repeat("a", 64)},
				}
				for i, s := range p.Stages {
					if s.Base != want[i] {
						t.Errorf("stage %d base = %+v, want %+v", i, s.Base, want[i])
					}
				}
			},
		},
		{
			name: "multi-stage with names and copy from",
			src: `FROM debian:12 AS Build
RUN echo hi
FROM build AS second
FROM scratch
COPY --from=build --chown=1000:1000 /out/app /app
COPY --from=1 /x /y
`,
			check: func(t *testing.T, p *Plan) {
				if p.Stages[0].Name != "build" || p.Stages[1].Base != (Base{Kind: BaseStage, Stage: 0}) {
					t.Fatalf("stages = %+v", p.Stages)
				}
				c := p.Final().Steps[0]
				if c.Kind != Copy || c.FromIdx != 0 || c.Chown != "1000:1000" || c.Dest != "/app" || !reflect.DeepEqual(c.Sources, []string{"/out/app"}) || c.Line != 5 {
					t.Fatalf("copy = %+v", c)
				}
				if p.Final().Steps[1].FromIdx != 1 {
					t.Fatalf("--from=1 = %+v", p.Final().Steps[1])
				}
			},
		},
		{
			name: "run shell and exec forms, shell, cmd, entrypoint",
			src: `FROM scratch
SHELL ["/bin/bash", "-eu", "-c"]
RUN apt-get update && \
    apt-get install -y python3
RUN ["/bin/echo", "exec form"]
CMD ["python3", "app.py"]
ENTRYPOINT /entry.sh
`,
			check: func(t *testing.T, p *Plan) {
				st := p.Final().Steps
				if st[0].Kind != Shell || !reflect.DeepEqual(st[0].Args, []string{"/bin/bash", "-eu", "-c"}) {
					t.Errorf("shell = %+v", st[0])
				}
				if !st[1].ShellForm || st[1].Args[0] != "apt-get update &&     apt-get install -y python3" || st[1].Line != 3 {
					t.Errorf("run shell form = %+v", st[1])
				}
				if st[2].ShellForm || !reflect.DeepEqual(st[2].Args, []string{"/bin/echo", "exec form"}) {
					t.Errorf("run exec form = %+v", st[2])
				}
				if st[3].Kind != Cmd || st[3].ShellForm || st[4].Kind != Entrypoint || !st[4].ShellForm {
					t.Errorf("cmd/entrypoint = %+v %+v", st[3], st[4])
				}
			},
		},
		{
			name: "meta args in FROM with build args",
			src:  "ARG BASE=debian:12\nARG TAG\nFROM ${BASE}\nARG TAG\nRUN echo $TAG\n",
			args: map[string]string{"TAG": "v2"},
			check: func(t *testing.T, p *Plan) {
				if p.Stages[0].From != "debian:12" || p.MetaArgs["TAG"] != "v2" {
					t.Fatalf("from = %q, meta = %v", p.Stages[0].From, p.MetaArgs)
				}
			},
		},
		{
			name: "build arg overrides base",
			src:  "ARG BASE=debian:12\nFROM $BASE\n",
			args: map[string]string{"BASE": "scratch"},
			check: func(t *testing.T, p *Plan) {
				if p.Stages[0].Base.Kind != BaseScratch {
					t.Fatalf("base = %+v", p.Stages[0].Base)
				}
			},
		},
		{
			name: "env label expose stopsignal user workdir add",
			src: `FROM scratch
ENV A=1 B="two words"
LABEL org.example.v=1
EXPOSE 8080 9000/udp
STOPSIGNAL SIGINT
USER app:app
WORKDIR /srv
ADD --chown=app https://example.invalid/x.tar.gz /opt/
`,
			check: func(t *testing.T, p *Plan) {
				st := p.Final().Steps
				if !reflect.DeepEqual(st[0].KVs, []KV{{"A", "1", true}, {"B", `"two words"`, true}}) {
					t.Errorf("env = %+v", st[0].KVs)
				}
				if !reflect.DeepEqual(st[2].Ports, []string{"8080", "9000/udp"}) || st[3].Value != "SIGINT" || st[4].Value != "app:app" || st[5].Value != "/srv" {
					t.Errorf("steps = %+v", st)
				}
				if st[6].Kind != Add || st[6].Chown != "app" || st[6].Dest != "/opt/" {
					t.Errorf("add = %+v", st[6])
				}
			},
		},
		{name: "unsupported HEALTHCHECK names line", src: "FROM scratch\n\nHEALTHCHECK CMD true\n", errHas: "line 3: HEALTHCHECK is not supported"},
		{name: "unsupported VOLUME", src: "FROM scratch\nVOLUME /data\n", errHas: "line 2: VOLUME is not supported"},
		{name: "unsupported ONBUILD", src: "FROM scratch\nONBUILD RUN x\n", errHas: "ONBUILD is not supported"},
		{name: "unsupported MAINTAINER", src: "FROM scratch\nMAINTAINER me\n", errHas: "MAINTAINER is not supported"},
		{name: "unknown instruction", src: "FROM scratch\nFROBNICATE x\n", errHas: "line 2: FROBNICATE is not supported"},
		{
			name: "run mounts",
			src: `FROM scratch
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked,id=apt \
    --mount=type=cache,dst=/root/.cache,mode=0700,uid=1000,gid=1000 \
    --mount=type=bind,source=src,target=/src \
    --mount=type=bind,target=/ctx,rw \
    --mount=type=tmpfs,destination=/tmp,size=64m \
    make
RUN --mount=target=/b,src=.,ro=true true
`,
			check: func(t *testing.T, p *Plan) {
				got := p.Final().Steps[0].Mounts
				want := []Mount{
					{Type: MountCache, Target: "/var/cache/apt", ID: "apt", Sharing: SharingLocked, Mode: 0o755},
					{Type: MountCache, Target: "/root/.cache", Mode: 0o700, UID: 1000, GID: 1000},
					{Type: MountBind, Target: "/src", Source: "src", ReadOnly: true, Mode: 0o755},
					{Type: MountBind, Target: "/ctx", Mode: 0o755},
					{Type: MountTmpfs, Target: "/tmp", Mode: 0o755, SizeBytes: 64 << 20},
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("mounts =\n%+v\nwant\n%+v", got, want)
				}
				if p.Final().Steps[0].Args[0] != "make" {
					t.Fatalf("args = %q", p.Final().Steps[0].Args)
				}
				// type defaults to bind, as in BuildKit.
				if m := p.Final().Steps[1].Mounts; len(m) != 1 || m[0].Type != MountBind || !m[0].ReadOnly || m[0].Source != "." {
					t.Fatalf("default mount = %+v", m)
				}
			},
		},
		{name: "run mount secret", src: "FROM scratch\nRUN --mount=type=secret,id=tok true\n", errHas: "line 2: RUN --mount=type=secret is not supported: kiln supports type=cache"},
		{name: "run mount ssh", src: "FROM scratch\nRUN --mount=type=ssh true\n", errHas: "type=ssh is not supported"},
		{name: "run mount unknown type", src: "FROM scratch\nRUN --mount=type=nfs,target=/x true\n", errHas: "kiln supports type=cache"},
		{name: "run mount from stage", src: "FROM scratch AS a\nFROM scratch\nRUN --mount=type=bind,from=a,target=/a true\n", errHas: "from=a is not supported"},
		{name: "run mount cache from", src: "FROM scratch\nRUN --mount=type=cache,from=img,target=/a true\n", errHas: "from=img is not supported"},
		{name: "run mount no target", src: "FROM scratch\nRUN --mount=type=cache true\n", errHas: "target= is required"},
		{name: "run mount unknown key", src: "FROM scratch\nRUN --mount=type=cache,target=/a,colour=red true\n", errHas: "unexpected key"},
		{name: "run mount bad sharing", src: "FROM scratch\nRUN --mount=type=cache,target=/a,sharing=all true\n", errHas: "sharing"},
		{name: "run mount uid on bind", src: "FROM scratch\nRUN --mount=type=bind,target=/a,uid=1 true\n", errHas: "uid not allowed"},
		{name: "run mount id on bind", src: "FROM scratch\nRUN --mount=type=bind,target=/a,id=x true\n", errHas: "id= applies to type=cache only"},
		{name: "run mount source on cache", src: "FROM scratch\nRUN --mount=type=cache,target=/a,source=x true\n", errHas: "source= applies to type=bind only"},
		{name: "run network flag", src: "FROM scratch\nRUN --network=none true\n", errHas: "RUN --network is not supported by kiln (RUN supports --mount)"},
		{name: "run heredoc", src: "FROM scratch\nRUN <<EOF\necho hi\nEOF\n", errHas: "heredoc"},
		{name: "from platform", src: "FROM --platform=linux/arm64 scratch\n", errHas: "--platform"},
		{name: "unknown base", src: "FROM alpine:3\n", errHas: "unknown base"},
		{name: "no from", src: "ARG X=1\n", errHas: "no FROM"},
		{name: "instruction before from", src: "RUN true\nFROM scratch\n", errHas: "before the first FROM"},
		{name: "copy from unknown stage", src: "FROM scratch\nCOPY --from=nope /a /b\n", errHas: "no earlier stage"},
		{name: "copy from later index", src: "FROM scratch\nCOPY --from=0 /a /b\n", errHas: "no earlier stage with that index"},
		{name: "copy from its own stage", src: "FROM scratch AS a\nCOPY f /f\nCOPY --from=a /f /g\n", errHas: "cannot copy from itself"},
		{name: "copy from its own stage, other case", src: "FROM scratch AS a\nFROM scratch AS B\nCOPY --from=b /f /g\n", errHas: "cannot copy from itself"},
		{name: "copy from a later stage", src: "FROM scratch AS a\nCOPY --from=b /f /g\nFROM scratch AS b\n", errHas: "no earlier stage"},
		{name: "duplicate stage name", src: "FROM scratch AS a\nFROM scratch AS a\n", errHas: "duplicate stage"},
		{name: "add git", src: "FROM scratch\nADD --keep-git-dir=true https://example.invalid/x.git /x\n", errHas: "git"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse(strings.NewReader(tt.src), tt.args)
			if tt.errHas != "" {
				if err == nil {
					t.Fatalf("want error containing %q", tt.errHas)
				}
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.errHas) {
					t.Fatalf("err = %v, want ErrInvalid containing %q", err, tt.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, p)
		})
	}
}

func TestExpand(t *testing.T) {
	env := map[string]string{"APP": "/srv/app", "U": "1000", "P": "8080"}
	tests := []struct {
		name string
		in   Step
		want Step
	}{
		{name: "copy paths and chown", in: Step{Kind: Copy, Sources: []string{"$APP/*.py"}, Dest: "${APP}/", Chown: "$U:$U"}, want: Step{Kind: Copy, Sources: []string{"/srv/app/*.py"}, Dest: "/srv/app/", Chown: "1000:1000"}},
		{name: "env quotes removed", in: Step{Kind: Env, KVs: []KV{{"B", `"two words"`, true}}}, want: Step{Kind: Env, KVs: []KV{{"B", "two words", true}}}},
		{name: "workdir default value", in: Step{Kind: Workdir, Value: "${NOPE:-/tmp}/x"}, want: Step{Kind: Workdir, Value: "/tmp/x"}},
		{name: "env sees old values", in: Step{Kind: Env, KVs: []KV{{"PATH", "$APP/bin:$PATH", true}}}, want: Step{Kind: Env, KVs: []KV{{"PATH", "/srv/app/bin:", true}}}},
		{name: "expose", in: Step{Kind: Expose, Ports: []string{"$P/tcp"}}, want: Step{Kind: Expose, Ports: []string{"8080/tcp"}}},
		{name: "run mounts expanded", in: Step{Kind: Run, Args: []string{"echo $APP"}, ShellForm: true, Mounts: []Mount{{Type: MountCache, Target: "$APP/cache", ID: "c-$U"}, {Type: MountBind, Target: "/x", Source: "${P}"}}},
			want: Step{Kind: Run, Args: []string{"echo $APP"}, ShellForm: true, Mounts: []Mount{{Type: MountCache, Target: "/srv/app/cache", ID: "c-1000"}, {Type: MountBind, Target: "/x", Source: "8080"}}}},
		{name: "run left alone", in: Step{Kind: Run, Args: []string{"echo $APP"}, ShellForm: true}, want: Step{Kind: Run, Args: []string{"echo $APP"}, ShellForm: true}},
		{name: "escaped dollar", in: Step{Kind: User, Value: `\$U`}, want: Step{Kind: User, Value: "$U"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.in.Expand(env, '\\')
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestIgnore(t *testing.T) {
	ig, err := ParseIgnore(strings.NewReader("# comment\nnode_modules\n*.log\n!keep.log\nbuild/\n!build/keep\n"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		rel   string
		dir   bool
		wantX bool
	}{
		{"node_modules", true, true},
		{"node_modules/x/y.js", false, true},
		{"debug.log", false, true},
		{"keep.log", false, false},
		{"src/app.py", false, false},
		{"build", true, false}, // walked into: build/keep is re-included
		{"build/other", false, true},
		{"build/keep", false, false},
	}
	for _, tt := range tests {
		t.Run(tt.rel, func(t *testing.T) {
			if got := ig.Excluded(tt.rel, tt.dir); got != tt.wantX {
				t.Fatalf("Excluded(%q) = %v, want %v", tt.rel, got, tt.wantX)
			}
		})
	}
}

// FuzzParse feeds Parse arbitrary Dockerfiles (RUN --mount flags in the
// seeds): it must never panic, and what it accepts must expand.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"FROM scratch\nRUN true\n",
		"FROM debian:12 AS b\nCOPY --from=b /a /b\n",
		"FROM scratch AS a\nFROM scratch\nCOPY --from=a /x /y\nCOPY --from=0 /x /z\n",
		"FROM scratch\nRUN --mount=type=cache,target=/var/cache/apt,sharing=locked,id=apt,mode=0700,uid=1,gid=2 true\n",
		"FROM scratch\nRUN --mount=type=bind,source=src,target=/src,rw --mount=type=tmpfs,target=/t,size=1m make\n",
		"FROM scratch\nRUN --mount=type=secret,id=x true\n",
		"FROM scratch\nRUN --mount=type=bind,from=x,target=/a true\n",
		"FROM scratch\nRUN --mount=\"type=cache,target=/a b\" true\n",
		"ARG T=/c\nFROM scratch\nARG T\nRUN --mount=type=cache,target=$T,id=${T:-x} true\n",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, src string) {
		p, err := Parse(strings.NewReader(src), nil)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v is not ErrInvalid", err)
			}
			return
		}
		for _, st := range p.Stages {
			for _, s := range st.Steps {
				if s.FromIdx >= st.Index {
					// The builder reads an earlier stage's finished files.
					t.Fatalf("line %d copies from stage %d in stage %d", s.Line, s.FromIdx, st.Index)
				}
				for _, m := range s.Mounts {
					if m.Type != MountCache && m.Type != MountBind && m.Type != MountTmpfs {
						t.Fatalf("accepted mount type %q", m.Type)
					}
				}
				_, _ = s.Expand(map[string]string{"T": "/x"}, p.EscapeToken)
			}
		}
	})
}
