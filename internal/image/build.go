//go:build linux

package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
)

// ErrInvalid marks a build refused because of its input (Dockerfile,
// context), as opposed to a failure of kiln or the build VM.
var ErrInvalid = fmt.Errorf("invalid build input: %w", errdefs.ErrInvalid)

// Builder builds images. Its zero value is not usable: set DataDir, Runner
// and Bases.
type Builder struct {
	// DataDir is kiln's data directory; the cache lives in
	// DataDir/image-cache (a part per account, see cache.go).
	DataDir string
	Runner  Runner
	Bases   BaseResolver
	Logger  *slog.Logger
	// RunHeadroom is the free space given to a RUN step's disk. 0 = 2 GiB
	// (the disk is sparse, so unused headroom costs nothing).
	RunHeadroom int64
	// FinalHeadroom is the free space left in the final disk for the
	// app's own writes (through its copy-on-write overlay). 0 = 256 MiB.
	FinalHeadroom int64
	// RunTimeout bounds one RUN step. 0 = 30 minutes.
	RunTimeout time.Duration
	// HTTPClient fetches ADD URLs. It must dial through internal/egress
	// (the URL is the tenant's); nil = the built-in deny list's client
	// with a 10 minute timeout.
	HTTPClient *http.Client
	// MaxAddBytes bounds one ADD URL download. 0 = 1 GiB.
	MaxAddBytes int64
	// Limits bound ADD archives unpacked into the root. Zero = layer.DefaultImageLimits.
	Limits layer.Limits
	// CacheMountBytes is the size of one RUN --mount=type=cache (a sparse
	// ext4 image per account and cache id). 0 = DefaultCacheMountBytes.
	CacheMountBytes int64
	// MaxCacheMounts bounds the caches one account keeps; past it the
	// least recently used goes. 0 = DefaultMaxCacheMounts.
	MaxCacheMounts int
}

// Request is one build.
type Request struct {
	// Account owns the build; required. Every cache entry the build reads
	// or writes is that account's own (DataDir/image-cache/accounts/…),
	// except the entries of managed bases, which kiln built from its own
	// configured sources: so no tenant builds on, or learns about, what
	// another tenant's builds left in the cache.
	Account string
	// ContextDir is the unpacked code package (internal/image/source).
	ContextDir string
	// Dockerfile is the Dockerfile's path in the context; "" = "Dockerfile".
	Dockerfile string
	BuildArgs  map[string]string
	// Output is where the final read-only ext4 root disk is written.
	Output string
	// Label is the ext4 volume label (at most 16 bytes); "" = "kiln-root".
	Label string
	// Log receives the build log (step headers, RUN output) as it happens.
	Log io.Writer
}

// StepReport says how one step went.
type StepReport struct {
	Stage       int           `json:"stage"`
	Line        int           `json:"line"`
	Instruction string        `json:"instruction"`
	Cached      bool          `json:"cached"`
	Duration    time.Duration `json:"duration"`
}

// Result is a finished build.
type Result struct {
	Config   Config       `json:"config"`
	RootDisk string       `json:"rootDisk"`
	Key      string       `json:"key"` // cache key of the final root
	Steps    []StepReport `json:"steps"`
	Warnings []string     `json:"warnings,omitempty"`
}

// StepError is a build failure at one step of the Dockerfile.
type StepError struct {
	Stage       int
	Line        int
	Instruction string
	Err         error
}

func (e *StepError) Error() string {
	return fmt.Sprintf("step %q (line %d): %v", e.Instruction, e.Line, e.Err)
}
func (e *StepError) Unwrap() error { return e.Err }

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Build runs the Dockerfile in req.ContextDir and writes the root disk to
// req.Output. Work files live in a temporary folder under DataDir that is
// removed when Build returns, whatever happens; only complete cache
// entries and, on success, req.Output remain.
func (b *Builder) Build(ctx context.Context, req Request) (*Result, error) {
	if req.Account == "" {
		return nil, fmt.Errorf("build request names no account (caches are per account): %w", errdefs.ErrInvalid)
	}
	if req.Log == nil {
		req.Log = io.Discard
	}
	if req.Label == "" {
		req.Label = "kiln-root"
	}
	dfName := req.Dockerfile
	if dfName == "" {
		dfName = "Dockerfile"
	}
	ctxRoot, err := os.OpenRoot(req.ContextDir)
	if err != nil {
		return nil, fmt.Errorf("opening build context: %w", err)
	}
	defer ctxRoot.Close()
	df, err := ctxRoot.Open(dfName)
	if err != nil {
		return nil, fmt.Errorf("%w: no %s at the root of the code package: %v", ErrInvalid, dfName, err)
	}
	plan, err := dockerfile.Parse(io.LimitReader(df, 1<<20), req.BuildArgs)
	df.Close()
	if err != nil {
		return nil, err
	}
	var ig *dockerfile.Ignore
	if f, err := ctxRoot.Open(".dockerignore"); err == nil {
		ig, err = dockerfile.ParseIgnore(io.LimitReader(f, 1<<20))
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
	} else {
		ig, _ = dockerfile.ParseIgnore(nil)
	}
	if err := os.MkdirAll(filepath.Join(b.DataDir, "tmp"), 0o700); err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(filepath.Join(b.DataDir, "tmp"), "build-")
	if err != nil {
		return nil, fmt.Errorf("creating build work folder: %w", err)
	}
	defer func() {
		// Never remove files through a mount a failed step left behind.
		_ = rootfs.UnmountUnder(work)
		os.RemoveAll(work)
	}()

	bd := &build{
		b: b, req: req, plan: plan, ignore: ig, ctxRoot: ctxRoot, work: work,
		cache:  accountCache(b.DataDir, req.Account),
		shared: sharedCache(b.DataDir),
		stages: make([]*stageState, len(plan.Stages)),
		log:    b.logger(),
	}
	res := &Result{Warnings: plan.Warnings}
	needed := neededStages(plan)
	for i := range plan.Stages {
		if !needed[i] {
			continue
		}
		st, err := bd.runStage(ctx, i, res)
		if err != nil {
			bd.cleanup()
			return nil, err
		}
		bd.stages[i] = st
	}
	final := bd.stages[len(plan.Stages)-1]
	start := time.Now()
	disk, key, cached, err := bd.finalDisk(ctx, final)
	bd.cleanup()
	if err != nil {
		return nil, fmt.Errorf("writing final root disk: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(req.Output), 0o755); err != nil {
		return nil, err
	}
	tmpOut := req.Output + ".tmp"
	_ = os.Remove(tmpOut)
	if err := cpTree(ctx, disk, tmpOut); err != nil {
		return nil, err
	}
	if err := os.Chmod(tmpOut, 0o444); err != nil {
		return nil, err
	}
	if err := os.Rename(tmpOut, req.Output); err != nil {
		_ = os.Remove(tmpOut)
		return nil, err
	}
	res.Steps = append(res.Steps, StepReport{Stage: len(plan.Stages) - 1, Instruction: "(final root disk)", Cached: cached, Duration: time.Since(start)})
	res.Config = final.cfg
	res.RootDisk = req.Output
	res.Key = key
	return res, nil
}

func (b *Builder) logger() *slog.Logger {
	if b.Logger != nil {
		return b.Logger
	}
	return slog.Default()
}

// neededStages marks the final stage and every stage it depends on, so
// unused stages of a multi-target Dockerfile are not built.
func neededStages(p *dockerfile.Plan) map[int]bool {
	need := map[int]bool{}
	var mark func(i int)
	mark = func(i int) {
		if need[i] {
			return
		}
		need[i] = true
		s := p.Stages[i]
		if s.Base.Kind == dockerfile.BaseStage {
			mark(s.Base.Stage)
		}
		for _, st := range s.Steps {
			if st.FromIdx >= 0 && (st.Kind == dockerfile.Copy) {
				mark(st.FromIdx)
			}
		}
	}
	mark(len(p.Stages) - 1)
	return need
}

// root is where a stage's root currently is: a complete cache entry
// (shared, read-only), and possibly a private copy of it in the work
// folder that the next step may change in place.
type root struct {
	entry     string // cache entry folder; "" for scratch before any step
	entryKind entryKind
	priv      string // private folder or disk; "" if none
	privKind  entryKind
}

type stageState struct {
	key    string // key of the stage's root and config so far
	root   root
	cfg    Config
	shell  []string
	args   map[string]string // ARG values in scope
	folder string            // extracted folder for COPY --from, lazily
}

type build struct {
	b       *Builder
	req     Request
	plan    *dockerfile.Plan
	ignore  *dockerfile.Ignore
	ctxRoot *os.Root
	work    string
	cache   cache // the account's own entries
	shared  cache // managed bases' entries, the same for every account
	stages  []*stageState
	mounts  []*rootfs.Mounted // of disks, for COPY; closed by cleanup
	log     *slog.Logger
	seq     int
}

func (bd *build) cleanup() {
	for _, m := range bd.mounts {
		if err := m.Close(); err != nil {
			bd.log.Warn("unmounting build disk", "err", err)
		}
	}
	bd.mounts = nil
	for _, s := range bd.stages {
		if s != nil && s.root.priv != "" {
			os.RemoveAll(s.root.priv)
			s.root.priv = ""
		}
	}
}

func (bd *build) tmpName(prefix string) string {
	bd.seq++
	return filepath.Join(bd.work, fmt.Sprintf("%s-%d", prefix, bd.seq))
}

func (bd *build) logf(format string, a ...any) {
	fmt.Fprintf(bd.req.Log, format+"\n", a...)
}

func (bd *build) runStage(ctx context.Context, i int, res *Result) (*stageState, error) {
	s := bd.plan.Stages[i]
	st := &stageState{shell: []string{"/bin/sh", "-c"}, args: map[string]string{}}
	bd.logf("#%d FROM %s (line %d)", i, s.From, s.Line)
	start := time.Now()
	switch s.Base.Kind {
	case dockerfile.BaseScratch:
		st.key = keyOf("scratch")
		st.cfg = Config{Env: []string{defaultPath}}
	case dockerfile.BaseStage:
		prev := bd.stages[s.Base.Stage]
		st.key = keyOf("stage", prev.key)
		st.root = root{entry: prev.root.entry, entryKind: prev.root.entryKind}
		st.cfg = cloneConfig(prev.cfg)
		st.shell = append([]string(nil), prev.shell...)
	default:
		if bd.b.Bases == nil {
			return nil, &StepError{Stage: i, Line: s.Line, Instruction: "FROM " + s.From, Err: errors.New("no base resolver configured")}
		}
		rb, err := bd.b.Bases.Resolve(ctx, s.Base, bd.req.ContextDir)
		if err != nil {
			return nil, &StepError{Stage: i, Line: s.Line, Instruction: "FROM " + s.From, Err: err}
		}
		if rb.Release != nil {
			defer rb.Release()
		}
		st.key = keyOf("base", rb.Key)
		// Only a base kiln made itself may come from (or go into) the
		// shared cache; a tenant-supplied one stays in its account's.
		bc := bd.cache
		if rb.Shared {
			bc = bd.shared
		}
		st.cfg = cloneConfig(rb.Config)
		if len(st.cfg.Shell) > 0 {
			st.shell = append([]string(nil), st.cfg.Shell...)
		}
		if !hasEnv(st.cfg.Env, "PATH") {
			st.cfg.Env = append([]string{defaultPath}, st.cfg.Env...)
		}
		dir, kind, ok := bc.lookup(st.key)
		cached := ok
		if !ok {
			tmp := bd.tmpName("base")
			if err := os.Mkdir(tmp, 0o755); err != nil {
				return nil, err
			}
			if err := rb.Materialize(ctx, tmp); err != nil {
				os.RemoveAll(tmp)
				return nil, &StepError{Stage: i, Line: s.Line, Instruction: "FROM " + s.From, Err: err}
			}
			dir, err = bc.store(ctx, st.key, "FROM "+s.From, tmp, kindFolder)
			os.RemoveAll(tmp)
			if err != nil {
				return nil, err
			}
			kind = kindFolder
		}
		st.root = root{entry: dir, entryKind: kind}
		res.Steps = append(res.Steps, StepReport{Stage: i, Line: s.Line, Instruction: "FROM " + s.From, Cached: cached, Duration: time.Since(start)})
	}
	for _, raw := range s.Steps {
		start := time.Now()
		cached, err := bd.step(ctx, i, st, raw)
		if err != nil {
			var se *StepError
			if errors.As(err, &se) {
				return nil, err
			}
			return nil, &StepError{Stage: i, Line: raw.Line, Instruction: raw.Original, Err: err}
		}
		res.Steps = append(res.Steps, StepReport{Stage: i, Line: raw.Line, Instruction: raw.Original, Cached: cached, Duration: time.Since(start)})
	}
	return st, nil
}

// env is the stage's environment for expansion and RUN: ENV over ARG.
func (st *stageState) env() map[string]string {
	m := map[string]string{}
	for k, v := range st.args {
		m[k] = v
	}
	for _, kv := range st.cfg.Env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func (bd *build) step(ctx context.Context, si int, st *stageState, raw dockerfile.Step) (cached bool, err error) {
	s, err := raw.Expand(st.env(), bd.plan.EscapeToken)
	if err != nil {
		return false, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	bd.logf("#%d %s", si, raw.Original)
	meta := func(parts ...string) {
		st.key = keyOf(append([]string{st.key, string(s.Kind)}, parts...)...)
	}
	switch s.Kind {
	case dockerfile.Env:
		for _, kv := range s.KVs {
			st.cfg.Env = setEnv(st.cfg.Env, kv.Key, kv.Value)
			meta(kv.Key, kv.Value)
		}
		return true, nil
	case dockerfile.Arg:
		for _, kv := range s.KVs {
			v, given := bd.plan.BuildArgs[kv.Key]
			if !given {
				if kv.HasValue {
					v = kv.Value
				} else if mv, ok := bd.plan.MetaArgs[kv.Key]; ok {
					v = mv
				}
			}
			st.args[kv.Key] = v
			meta(kv.Key, v)
		}
		return true, nil
	case dockerfile.Label:
		if st.cfg.Labels == nil {
			st.cfg.Labels = map[string]string{}
		}
		for _, kv := range s.KVs {
			st.cfg.Labels[kv.Key] = kv.Value
		}
		return true, nil // labels do not change the root
	case dockerfile.Workdir:
		wd := s.Value
		if !path.IsAbs(wd) {
			wd = path.Join(orRoot(st.cfg.WorkingDir), wd)
		}
		st.cfg.WorkingDir = path.Clean(wd)
		meta(st.cfg.WorkingDir)
		return true, nil
	case dockerfile.User:
		st.cfg.User = s.Value
		meta(s.Value)
		return true, nil
	case dockerfile.Cmd:
		st.cfg.Cmd = st.argv(s)
		return true, nil
	case dockerfile.Entrypoint:
		st.cfg.Entrypoint = st.argv(s)
		// As docker does: a new ENTRYPOINT drops a CMD inherited from the
		// base (a CMD of this stage written before it is kept only if it
		// came after, which the order of steps already gives).
		st.cfg.Cmd = nil
		return true, nil
	case dockerfile.Expose:
		for _, p := range s.Ports {
			if !strings.Contains(p, "/") {
				p += "/tcp"
			}
			if !contains(st.cfg.ExposedPorts, p) {
				st.cfg.ExposedPorts = append(st.cfg.ExposedPorts, p)
			}
		}
		sort.Strings(st.cfg.ExposedPorts)
		return true, nil
	case dockerfile.StopSignal:
		st.cfg.StopSignal = s.Value
		return true, nil
	case dockerfile.Shell:
		st.shell = append([]string(nil), s.Args...)
		st.cfg.Shell = st.shell
		meta(s.Args...)
		return true, nil
	case dockerfile.Run:
		return bd.run(ctx, st, s)
	case dockerfile.Copy, dockerfile.Add:
		return bd.copy(ctx, st, s)
	}
	return false, fmt.Errorf("%w: %s is not supported", ErrInvalid, s.Kind)
}

func (st *stageState) argv(s dockerfile.Step) []string {
	if s.ShellForm {
		return append(append([]string(nil), st.shell...), s.Args...)
	}
	return append([]string(nil), s.Args...)
}

// runEnv is the environment a RUN command sees: ARGs, then ENV over them.
func (st *stageState) runEnv() []string {
	env := append([]string(nil), st.cfg.Env...)
	keys := make([]string, 0, len(st.args))
	for k := range st.args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !hasEnv(env, k) {
			env = append(env, k+"="+st.args[k])
		}
	}
	return env
}

func (bd *build) run(ctx context.Context, st *stageState, s dockerfile.Step) (bool, error) {
	if bd.b.Runner == nil {
		return false, errors.New("no build VM runner configured")
	}
	step := RunStep{
		Args:        st.argv(s),
		Env:         st.runEnv(),
		WorkDir:     orRoot(st.cfg.WorkingDir),
		Timeout:     bd.b.RunTimeout,
		Line:        s.Line,
		Instruction: s.Original,
	}
	if step.Timeout == 0 {
		step.Timeout = 30 * time.Minute
	}
	plans, mountsKey, err := bd.planMounts(ctx, st, s)
	if err != nil {
		return false, err
	}
	parts := []string{st.key, "RUN", strings.Join(step.Args, "\x00"), strings.Join(step.Env, "\x00"), step.WorkDir, st.cfg.User}
	if mountsKey != "" {
		// Only with mounts, so keys of steps without them stay as they were.
		parts = append(parts, "mounts", mountsKey)
	}
	key := keyOf(parts...)
	if dir, kind, ok := bd.cache.lookup(key); ok {
		bd.logf("  cached")
		st.advance(key, dir, kind)
		return true, nil
	}
	// Resolved here only to fail early, with the step's line, on a user
	// the root does not have.
	if _, _, err := bd.resolveUser(ctx, st, st.cfg.User); err != nil {
		return false, err
	}
	step.User = st.cfg.User
	disk, err := bd.privateDisk(ctx, st)
	if err != nil {
		return false, err
	}
	mounts, release, err := bd.prepareMounts(ctx, plans)
	if err != nil {
		return false, err
	}
	step.Mounts = mounts
	out, err := bd.b.Runner.Run(ctx, disk, step, bd.req.Log)
	var me *MountError
	if errors.As(err, &me) && me.Index >= 0 && me.Index < len(mounts) && mounts[me.Index].Type == dockerfile.MountCache && !mounts[me.Index].Fresh {
		// Still locked: no other build uses it.
		resetCacheMount(mounts[me.Index].Disk)
		err = fmt.Errorf("%w (the %s could not be mounted, its file system is damaged: kiln emptied it; run the build again)", err, mounts[me.Index].Name)
	}
	release()
	if out != "" && out != disk {
		os.Remove(disk)
		disk = out
	}
	st.root.priv, st.root.privKind = disk, kindDisk
	if err != nil {
		return false, fmt.Errorf("RUN: %w", err)
	}
	dir, err := bd.cache.store(ctx, key, s.Original, disk, kindDisk)
	if err != nil {
		return false, err
	}
	st.key = key
	st.root.entry, st.root.entryKind = dir, kindDisk
	return false, nil
}

// advance moves the stage to a cached entry, dropping its private copy.
func (st *stageState) advance(key, dir string, kind entryKind) {
	if st.root.priv != "" {
		os.RemoveAll(st.root.priv)
	}
	st.key = key
	st.root = root{entry: dir, entryKind: kind}
	st.folder = ""
}

// privateRoot returns a private, writable folder holding the stage's root,
// for COPY and ADD. A root that is a disk (a RUN made it) stays a disk: it
// is mounted, with room for need, and m is its mount, to be closed before
// the disk is used again. Otherwise m is nil.
func (bd *build) privateRoot(ctx context.Context, st *stageState, need treeSize) (dir string, m *rootfs.Mounted, err error) {
	r := &st.root
	if r.priv != "" && r.privKind == kindFolder {
		return r.priv, nil, nil
	}
	if (r.priv != "" && r.privKind == kindDisk) || (r.entry != "" && r.entryKind == kindDisk) {
		disk, err := bd.privateDisk(ctx, st)
		if err != nil {
			return "", nil, err
		}
		// Headroom for ext4's own blocks (directories, extent trees)
		// on top of the files' sizes.
		if err := rootfs.EnsureFree(ctx, disk, need.bytes+need.bytes/8+64<<20, need.entries+1024); err != nil {
			return "", nil, err
		}
		m, err := bd.mount(ctx, disk, false)
		if err != nil {
			return "", nil, err
		}
		return m.Dir, m, nil
	}
	dst := bd.tmpName("root")
	if r.entry == "" {
		if err := os.Mkdir(dst, 0o755); err != nil {
			return "", nil, err
		}
	} else if err := cpTree(ctx, filepath.Join(r.entry, "rootfs"), dst); err != nil {
		return "", nil, err
	}
	r.priv, r.privKind = dst, kindFolder
	return dst, nil, nil
}

// mount serves a disk at a new folder of the build's work folder; the
// mount ends with the build at the latest.
func (bd *build) mount(ctx context.Context, disk string, readOnly bool) (*rootfs.Mounted, error) {
	dir := bd.tmpName("mnt")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err
	}
	m, err := rootfs.Mount(ctx, disk, dir, readOnly)
	if err != nil {
		return nil, err
	}
	bd.mounts = append(bd.mounts, m)
	return m, nil
}

func (bd *build) maxAddBytes() int64 {
	if bd.b.MaxAddBytes > 0 {
		return bd.b.MaxAddBytes
	}
	return 1 << 30
}

// privateDisk returns a private, writable ext4 image holding the stage's
// root, with RunHeadroom free.
func (bd *build) privateDisk(ctx context.Context, st *stageState) (string, error) {
	r := &st.root
	if r.priv != "" && r.privKind == kindDisk {
		return r.priv, nil
	}
	dst := bd.tmpName("disk") + ".ext4"
	headroom := bd.b.RunHeadroom
	if headroom == 0 {
		headroom = 2 << 30
	}
	var src string
	switch {
	case r.priv != "":
		src = r.priv
	case r.entry == "":
		src = bd.tmpName("empty")
		if err := os.Mkdir(src, 0o755); err != nil {
			return "", err
		}
		defer os.Remove(src)
	case r.entryKind == kindDisk:
		if err := cpTree(ctx, filepath.Join(r.entry, "root.ext4"), dst); err != nil {
			return "", err
		}
		r.priv, r.privKind = dst, kindDisk
		return dst, nil
	default:
		src = filepath.Join(r.entry, "rootfs")
	}
	used, inodes, err := rootfs.DiskUsage(src)
	if err != nil {
		return "", err
	}
	if err := rootfs.BuildExt4(ctx, src, dst, rootfs.AutoSize(used, inodes)+headroom, "kiln-build"); err != nil {
		return "", err
	}
	if r.priv != "" {
		os.RemoveAll(r.priv)
	}
	r.priv, r.privKind = dst, kindDisk
	return dst, nil
}

// finalDisk returns the finished disk for the stage, from the cache when
// an identical root was finished before.
func (bd *build) finalDisk(ctx context.Context, st *stageState) (disk, key string, cached bool, err error) {
	key = keyOf(st.key, "final", orRoot(st.cfg.WorkingDir), bd.req.Label)
	final := filepath.Join(bd.cache.path(key), "final.ext4")
	if _, err := os.Stat(final); err == nil {
		now := time.Now()
		_ = os.Chtimes(filepath.Join(bd.cache.path(key), "meta.json"), now, now)
		return final, key, true, nil
	}
	tmp := bd.tmpName("final") + ".ext4"
	headroom := bd.b.FinalHeadroom
	if headroom == 0 {
		headroom = 256 << 20
	}
	r := st.root
	switch {
	case r.entry != "" && r.entryKind == kindDisk:
		if err := cpTree(ctx, filepath.Join(r.entry, "root.ext4"), tmp); err != nil {
			return "", "", false, err
		}
		// A RUN disk carries the build label; the final one is relabelled
		// by tune2fs-free means: mkfs is not re-run, so keep it (the VM
		// engine finds the root by device, not label).
	default:
		src := ""
		if r.entry != "" {
			src = filepath.Join(r.entry, "rootfs")
		} else {
			src = bd.tmpName("empty")
			if err := os.Mkdir(src, 0o755); err != nil {
				return "", "", false, err
			}
		}
		used, inodes, err := rootfs.DiskUsage(src)
		if err != nil {
			return "", "", false, err
		}
		if err := rootfs.BuildExt4(ctx, src, tmp, rootfs.AutoSize(used, inodes)-64<<20+headroom, bd.req.Label); err != nil {
			return "", "", false, err
		}
	}
	if wd := st.cfg.WorkingDir; wd != "" && wd != "/" {
		if err := rootfs.Mkdir(ctx, tmp, wd); err != nil {
			return "", "", false, err
		}
	}
	dir, err := bd.cache.store(ctx, key, "final", tmp, kindDisk)
	os.Remove(tmp)
	if err != nil {
		return "", "", false, err
	}
	// store names disks root.ext4; the final entry is read through its own
	// name so a lookup for a RUN key never matches it.
	if err := os.Rename(filepath.Join(dir, "root.ext4"), filepath.Join(dir, "final.ext4")); err != nil && !os.IsNotExist(err) {
		return "", "", false, err
	}
	return filepath.Join(dir, "final.ext4"), key, false, nil
}

func orRoot(wd string) string {
	if wd == "" {
		return "/"
	}
	return wd
}

func hasEnv(env []string, key string) bool {
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == key {
			return true
		}
	}
	return false
}

func setEnv(env []string, key, val string) []string {
	for i, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); k == key {
			out := append([]string(nil), env...)
			out[i] = key + "=" + val
			return out
		}
	}
	return append(append([]string(nil), env...), key+"="+val)
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func cloneConfig(c Config) Config {
	out := c
	out.Env = append([]string(nil), c.Env...)
	out.Entrypoint = append([]string(nil), c.Entrypoint...)
	out.Cmd = append([]string(nil), c.Cmd...)
	out.ExposedPorts = append([]string(nil), c.ExposedPorts...)
	out.Shell = append([]string(nil), c.Shell...)
	if c.Labels != nil {
		out.Labels = map[string]string{}
		for k, v := range c.Labels {
			out.Labels[k] = v
		}
	}
	return out
}
