// Package dockerfile turns a Dockerfile into a build plan: stages with
// their bases and steps. Parsing is buildkit's (parser and instructions
// packages); this package decides what kiln supports, resolves each
// stage's base, and expands variables the way docker build does, with
// buildkit's shell lexer.
//
// Word expansion needs the environment of the stage at that step, which
// depends on the base image's ENV, so Parse keeps words as written and the
// executor calls Step.Expand with the environment it has.
package dockerfile

import (
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/buildkit/frontend/dockerfile/shell"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// ErrInvalid marks a Dockerfile kiln refuses: bad syntax, an unsupported
// instruction or flag, an unknown stage.
var ErrInvalid = fmt.Errorf("invalid Dockerfile: %w", errdefs.ErrInvalid)

// BaseKind says where a stage's starting root comes from.
type BaseKind int

const (
	BaseScratch    BaseKind = iota // empty root
	BaseManaged                    // a kiln managed base, Ref = its name ("debian-12")
	BaseStage                      // an earlier stage, Stage = its index
	BaseOCIArchive                 // oci-archive or docker-archive tar in the build context, Ref = path
	BaseRegistry                   // an image in an OCI registry, Ref = the reference
)

func (k BaseKind) String() string {
	return [...]string{"scratch", "managed", "stage", "oci-archive", "registry"}[k]
}

// Base is a resolved FROM.
type Base struct {
	Kind  BaseKind
	Ref   string // managed name, archive path or registry reference
	Stage int    // for BaseStage
}

// managedAliases map image names to kiln's managed bases. debian:*-slim
// maps to the same minbase root: it is already smaller than slim.
var managedAliases = map[string]string{
	"debian:12":            "debian-12",
	"debian:bookworm":      "debian-12",
	"debian:bookworm-slim": "debian-12",
	"debian:12-slim":       "debian-12",
	"debian-12":            "debian-12",
}

// Kind of a build step.
type Kind string

const (
	Run        Kind = "RUN"
	Copy       Kind = "COPY"
	Add        Kind = "ADD"
	Env        Kind = "ENV"
	Arg        Kind = "ARG"
	Workdir    Kind = "WORKDIR"
	User       Kind = "USER"
	Cmd        Kind = "CMD"
	Entrypoint Kind = "ENTRYPOINT"
	Expose     Kind = "EXPOSE"
	Label      Kind = "LABEL"
	StopSignal Kind = "STOPSIGNAL"
	Shell      Kind = "SHELL"
)

// KV is a key and value (ENV, LABEL, ARG). For ARG, HasValue says whether
// a default was written.
type KV struct {
	Key, Value string
	HasValue   bool
}

// Step is one instruction after FROM, with its words as written.
type Step struct {
	Kind     Kind
	Line     int    // 1-based line of the instruction
	Original string // the instruction's text, for logs and cache keys

	// RUN, CMD, ENTRYPOINT: Args is the exec form, or the shell-form
	// command line as one element with ShellForm set.
	Args      []string
	ShellForm bool
	// RUN --mount flags, in the order written.
	Mounts []Mount

	// COPY, ADD.
	Sources  []string
	Dest     string
	From     string // COPY --from as written
	FromIdx  int    // resolved stage index, -1 = the build context
	Chown    string
	Chmod    string
	Exclude  []string // --exclude patterns
	Checksum string   // ADD --checksum

	// ENV, LABEL, ARG.
	KVs []KV

	// WORKDIR, USER, STOPSIGNAL: the argument. EXPOSE: Ports. SHELL: Args.
	Value string
	Ports []string
}

// Stage is a FROM and the steps after it.
type Stage struct {
	Index int
	Name  string // AS name, lower case; "" if none
	Line  int
	From  string // the base as written, after meta-ARG expansion
	Base  Base
	Steps []Step
}

// Plan is a parsed Dockerfile.
type Plan struct {
	Stages []Stage
	// EscapeToken is the Dockerfile's escape character, for expansion.
	EscapeToken rune
	// BuildArgs are the build arguments given to Parse; ARG steps read
	// them.
	BuildArgs map[string]string
	// MetaArgs are the ARGs before the first FROM, with their values
	// after build args apply; an in-stage "ARG NAME" without a default
	// takes its value from here.
	MetaArgs map[string]string
	// Warnings from the parser and for unused build args.
	Warnings []string
}

// Final is the stage that becomes the image: the last one.
func (p *Plan) Final() *Stage { return &p.Stages[len(p.Stages)-1] }

// supported lists the instructions kiln implements (lower case, as the
// parser reports them).
var supported = map[string]bool{
	"from": true, "run": true, "copy": true, "add": true, "env": true, "arg": true,
	"workdir": true, "user": true, "cmd": true, "entrypoint": true, "expose": true,
	"label": true, "stopsignal": true, "shell": true,
}

// Parse reads a Dockerfile. buildArgs override ARG defaults.
func Parse(r io.Reader, buildArgs map[string]string) (*Plan, error) {
	res, err := parser.Parse(r)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	p := &Plan{EscapeToken: res.EscapeToken, BuildArgs: buildArgs, MetaArgs: map[string]string{}}
	for _, w := range res.Warnings {
		p.Warnings = append(p.Warnings, w.Short)
	}
	lex := shell.NewLex(res.EscapeToken)
	names := map[string]int{}
	for _, node := range res.AST.Children {
		line := node.StartLine
		ins := strings.ToLower(node.Value)
		if !supported[ins] {
			return nil, fmt.Errorf("%w: line %d: %s is not supported by kiln (supported: FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT, EXPOSE, LABEL, SHELL, STOPSIGNAL)", ErrInvalid, line, strings.ToUpper(node.Value))
		}
		parsed, err := instructions.ParseInstruction(node)
		if err != nil {
			return nil, fmt.Errorf("%w: line %d: %v", ErrInvalid, line, err)
		}
		if st, ok := parsed.(*instructions.Stage); ok {
			s, err := p.newStage(st, line, lex, names)
			if err != nil {
				return nil, err
			}
			if s.Name != "" {
				names[s.Name] = s.Index
			}
			p.Stages = append(p.Stages, s)
			continue
		}
		if len(p.Stages) == 0 {
			a, ok := parsed.(*instructions.ArgCommand)
			if !ok {
				return nil, fmt.Errorf("%w: line %d: %s before the first FROM (only ARG may come before FROM)", ErrInvalid, line, strings.ToUpper(node.Value))
			}
			if err := p.metaArg(a, lex); err != nil {
				return nil, fmt.Errorf("%w: line %d: %v", ErrInvalid, line, err)
			}
			continue
		}
		step, err := convert(parsed, line, names, len(p.Stages))
		if err != nil {
			return nil, err
		}
		cur := &p.Stages[len(p.Stages)-1]
		cur.Steps = append(cur.Steps, step)
	}
	if len(p.Stages) == 0 {
		return nil, fmt.Errorf("%w: no FROM instruction", ErrInvalid)
	}
	return p, nil
}

func (p *Plan) metaArg(a *instructions.ArgCommand, lex *shell.Lex) error {
	for _, kv := range a.Args {
		v, given := p.BuildArgs[kv.Key]
		if !given && kv.Value != nil {
			ex, _, err := lex.ProcessWord(*kv.Value, envMap(p.MetaArgs))
			if err != nil {
				return fmt.Errorf("ARG %s: %w", kv.Key, err)
			}
			v = ex
		}
		p.MetaArgs[kv.Key] = v
	}
	return nil
}

func (p *Plan) newStage(st *instructions.Stage, line int, lex *shell.Lex, names map[string]int) (Stage, error) {
	if st.Platform != "" {
		return Stage{}, fmt.Errorf("%w: line %d: FROM --platform is not supported (kiln builds for the host's architecture)", ErrInvalid, line)
	}
	from, _, err := lex.ProcessWord(st.BaseName, envMap(p.MetaArgs))
	if err != nil {
		return Stage{}, fmt.Errorf("%w: line %d: FROM: %v", ErrInvalid, line, err)
	}
	s := Stage{Index: len(p.Stages), Name: strings.ToLower(st.Name), Line: line, From: from}
	if _, dup := names[s.Name]; dup && s.Name != "" {
		return Stage{}, fmt.Errorf("%w: line %d: duplicate stage name %q", ErrInvalid, line, st.Name)
	}
	s.Base, err = ResolveBase(from, names)
	if err != nil {
		return Stage{}, fmt.Errorf("%w: line %d: %v", ErrInvalid, line, err)
	}
	return s, nil
}

// registryRef matches host[:port]/path[:tag][@digest] where host has a dot
// or a port or is localhost, which is how docker tells a registry host
// from a Docker Hub namespace.
var registryRef = regexp.MustCompile(`^((localhost|[a-zA-Z0-9.-]+\.[a-zA-Z0-9.-]+|[a-zA-Z0-9.-]+:[0-9]+|\[[0-9a-fA-F:]+\](:[0-9]+)?)(:[0-9]+)?)/[a-z0-9._/-]+(:[A-Za-z0-9._-]+)?(@sha256:[a-f0-9]{64})?$`)

// ResolveBase maps a FROM argument to a base. names are the stages defined
// so far.
func ResolveBase(from string, names map[string]int) (Base, error) {
	lf := strings.ToLower(from)
	if i, ok := names[lf]; ok {
		return Base{Kind: BaseStage, Stage: i}, nil
	}
	switch {
	case lf == "scratch":
		return Base{Kind: BaseScratch}, nil
	case managedAliases[lf] != "":
		return Base{Kind: BaseManaged, Ref: managedAliases[lf]}, nil
	case strings.HasPrefix(lf, "oci-archive:"), strings.HasPrefix(lf, "docker-archive:"):
		p := from[strings.IndexByte(from, ':')+1:]
		if p == "" {
			return Base{}, fmt.Errorf("FROM %s: missing archive path", from)
		}
		return Base{Kind: BaseOCIArchive, Ref: p}, nil
	case registryRef.MatchString(from):
		return Base{Kind: BaseRegistry, Ref: from}, nil
	}
	return Base{}, fmt.Errorf("FROM %s: unknown base; use debian:12 (kiln's managed debian-12), scratch, an earlier stage, oci-archive:PATH.tar from the code package, or a registry reference host:port/name:tag", from)
}

func convert(c any, line int, names map[string]int, nstages int) (Step, error) {
	s := Step{Line: line, FromIdx: -1}
	if o, ok := c.(interface{ String() string }); ok {
		s.Original = o.String()
	}
	bad := func(format string, a ...any) (Step, error) {
		return Step{}, fmt.Errorf("%w: line %d: "+format, append([]any{ErrInvalid, line}, a...)...)
	}
	switch c := c.(type) {
	case *instructions.RunCommand:
		for _, f := range c.FlagsUsed {
			if f != "mount" {
				return bad("RUN --%s is not supported by kiln (RUN supports --mount)", f)
			}
		}
		if len(c.Files) > 0 {
			return bad("RUN with a heredoc is not supported by kiln; put the script in a file and COPY it")
		}
		mounts, err := runMounts(c)
		if err != nil {
			return bad("%v", err)
		}
		s.Kind, s.Args, s.ShellForm, s.Mounts = Run, c.CmdLine, c.PrependShell, mounts
	case *instructions.CmdCommand:
		if len(c.Files) > 0 {
			return bad("CMD with a heredoc is not supported")
		}
		s.Kind, s.Args, s.ShellForm = Cmd, c.CmdLine, c.PrependShell
	case *instructions.EntrypointCommand:
		s.Kind, s.Args, s.ShellForm = Entrypoint, c.CmdLine, c.PrependShell
	case *instructions.CopyCommand:
		if c.Parents {
			return bad("COPY --parents is not supported by kiln")
		}
		if len(c.SourceContents) > 0 {
			return bad("COPY with a heredoc is not supported by kiln")
		}
		s.Kind, s.Sources, s.Dest, s.Chown, s.Chmod, s.Exclude = Copy, c.SourcePaths, c.DestPath, c.Chown, c.Chmod, c.ExcludePatterns
		if c.From != "" {
			s.From = c.From
			idx, err := stageRef(c.From, names, nstages)
			if err != nil {
				return bad("%v", err)
			}
			s.FromIdx = idx
		}
	case *instructions.AddCommand:
		if len(c.SourceContents) > 0 {
			return bad("ADD with a heredoc is not supported by kiln")
		}
		if c.KeepGitDir != nil {
			return bad("ADD --keep-git-dir (git sources) is not supported by kiln")
		}
		s.Kind, s.Sources, s.Dest, s.Chown, s.Chmod, s.Exclude, s.Checksum = Add, c.SourcePaths, c.DestPath, c.Chown, c.Chmod, c.ExcludePatterns, c.Checksum
	case *instructions.EnvCommand:
		s.Kind = Env
		for _, kv := range c.Env {
			s.KVs = append(s.KVs, KV{Key: kv.Key, Value: kv.Value, HasValue: true})
		}
	case *instructions.LabelCommand:
		s.Kind = Label
		for _, kv := range c.Labels {
			s.KVs = append(s.KVs, KV{Key: kv.Key, Value: kv.Value, HasValue: true})
		}
	case *instructions.ArgCommand:
		s.Kind = Arg
		for _, kv := range c.Args {
			s.KVs = append(s.KVs, KV{Key: kv.Key, Value: kv.ValueString(), HasValue: kv.Value != nil})
		}
	case *instructions.WorkdirCommand:
		s.Kind, s.Value = Workdir, c.Path
	case *instructions.UserCommand:
		s.Kind, s.Value = User, c.User
	case *instructions.StopSignalCommand:
		s.Kind, s.Value = StopSignal, c.Signal
	case *instructions.ExposeCommand:
		s.Kind, s.Ports = Expose, c.Ports
	case *instructions.ShellCommand:
		s.Kind, s.Args = Shell, c.Shell
	default:
		return bad("%T is not supported by kiln", c)
	}
	return s, nil
}

func stageRef(from string, names map[string]int, nstages int) (int, error) {
	if i, ok := names[strings.ToLower(from)]; ok {
		if i >= nstages-1 {
			// The stage being built: its files are not made yet.
			return 0, fmt.Errorf("COPY --from=%s: a stage cannot copy from itself; name an earlier stage", from)
		}
		return i, nil
	}
	if n, err := strconv.Atoi(from); err == nil {
		if n < 0 || n >= nstages-1 {
			return 0, fmt.Errorf("COPY --from=%d: no earlier stage with that index", n)
		}
		return n, nil
	}
	return 0, fmt.Errorf("COPY --from=%s: no earlier stage of that name (kiln copies only from stages of this Dockerfile)", from)
}

// envMap adapts a map to the lexer's EnvGetter.
type envMap map[string]string

func (m envMap) Get(k string) (string, bool) { v, ok := m[k]; return v, ok }
func (m envMap) Keys() []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}
