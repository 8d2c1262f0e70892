//go:build linux

package qemu

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// The clone pool keeps, per template, a few QEMU processes started ahead
// of time (Config.PoolSize): each already in its own jail under its own
// uid and cgroup, in a network namespace of its own (the new empty one
// the jail makes), with its own disk overlay, its TAP (when the template
// has a NIC) made in a spare VM namespace of its own (netns.NewSpare), and
// the template's device state loaded; then the guest runs with its
// workloads frozen (the agent's plain hello leaves them frozen), so that
// QEMU translates the guest's resume paths ahead. A clone then only
// renames the directory to the VM's, records "running" and refreshes the
// identity (reseed, clock, hostname, then thaw, in one message). Its
// network is made around the waiting TAP: the caller reserves the process
// first (ReservePooled) and names the spare namespace as the VM's
// (netns.Config.Spare); without a reservation the clone moves the TAP into
// the VM's namespace (netns.AdoptTap), which waits for RCU grace periods.
// Process start, jail, disk copy, state load and the guest's first steps
// leave the clone's critical path; tenant code still runs only after the
// identity refresh.
//
// A pooled process belongs to one template (its directory, memory file
// and creation time): templates are per account, so it is never handed to
// another account or template; a changed or deleted template drains its
// pool. Pooled processes are not VMs: List does not show them, and they
// are not adopted after a restart. Close kills them; if kiln dies, Recover
// kills what is left (they are found by their cgroup and jail root) and
// removes DATA_DIR/pool.

// StartPhases is how long each part of a VM's last clone or resume took.
type StartPhases struct {
	Pooled bool
	// Prepare: directory, disk overlay and record (a pooled clone: taking
	// the process and renaming its directory).
	Prepare time.Duration
	// Process: the jailed QEMU's fork/exec until QMP answers.
	Process time.Duration
	// Load: the agent socket connected and device state loaded (incoming
	// migration).
	Load time.Duration
	// Network: moving a pooled TAP into the VM's namespace (none when the
	// VM's network was made in the process's spare namespace).
	Network time.Duration
	// Record: vm.json says "running" (fsync).
	Record time.Duration
	// Resume: QMP `cont`.
	Resume time.Duration
	// Agent: the agent's hello, which carries the identity refresh (new
	// entropy, clock, hostname) in the same round trip.
	Agent time.Duration
}

// StartPhases returns the phases of VM id's last clone or resume.
func (d *Driver) StartPhases(id string) (StartPhases, bool) {
	v, err := d.get(id)
	if err != nil {
		return StartPhases{}, false
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.phases, v.phasesSet
}

// phaseClock measures consecutive phases.
type phaseClock struct{ last time.Time }

func newPhaseClock() *phaseClock { return &phaseClock{last: time.Now()} }

func (c *phaseClock) lap(d *time.Duration) {
	now := time.Now()
	*d += now.Sub(c.last)
	c.last = now
}

const poolIdleDefault = 10 * time.Minute

// poolKey tells one template from another at the same path.
type poolKey struct {
	dir     string
	memDev  uint64
	memIno  uint64
	created time.Time
	mac     string
}

func templateKey(t vmm.Template, mac string) (poolKey, error) {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(t.Dir, "mem"), &st); err != nil {
		return poolKey{}, err
	}
	return poolKey{dir: t.Dir, memDev: st.Dev, memIno: st.Ino, created: t.CreatedAt, mac: mac}, nil
}

type tmplPool struct {
	key     poolKey
	t       vmm.Template
	ready   []*vm
	lastUse time.Time
	failed  int // consecutive fill failures
}

// reservation is a pooled process set aside for a VM whose network is
// being made in its spare namespace.
type reservation struct {
	v   *vm
	key poolKey
	at  time.Time
}

// reserveTTL is how long a reservation waits for its Clone; for the
// first reserveQuiet of it no refill starts.
const (
	reserveTTL   = time.Minute
	reserveQuiet = 10 * time.Second
)

type pool struct {
	d    *Driver
	size int
	idle time.Duration

	mu       sync.Mutex
	pools    map[string]*tmplPool    // by template dir
	reserved map[string]*reservation // by VM id
	kick     chan struct{}
	stop     chan struct{}
	done     chan struct{}
}

func (d *Driver) poolDir() string { return filepath.Join(d.cfg.DataDir, "pool") }

func newPool(d *Driver, size int, idle time.Duration) *pool {
	if idle <= 0 {
		idle = poolIdleDefault
	}
	p := &pool{d: d, size: size, idle: idle, pools: map[string]*tmplPool{}, reserved: map[string]*reservation{},
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	return p
}

func (p *pool) poke() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// run refills pools one process at a time (a burst of QEMU starts would
// slow the clones running now) and drains pools whose template changed,
// went away or was not cloned for p.idle.
func (p *pool) run() {
	defer close(p.done)
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-p.kick:
		case <-tick.C:
		}
		p.sweep()
		for p.fillOne() {
			select {
			case <-p.stop:
				return
			default:
			}
		}
	}
}

// sweep drains the pools of templates that are gone, changed or idle.
func (p *pool) sweep() {
	p.mu.Lock()
	var drop []*vm
	for dir, tp := range p.pools {
		why := ""
		t, err := LoadTemplate(dir)
		if err != nil {
			why = "template gone"
		} else if k, err := templateKey(t, tp.key.mac); err != nil || k != tp.key {
			why = "template changed"
		} else if time.Since(tp.lastUse) > p.idle {
			why = "idle"
		}
		if why != "" {
			p.d.log.Debug("clone pool drained", "template", dir, "why", why, "processes", len(tp.ready))
			drop = append(drop, tp.ready...)
			delete(p.pools, dir)
		}
	}
	for id, r := range p.reserved {
		if time.Since(r.at) > reserveTTL {
			p.d.log.Warn("clone pool: a reserved process was not cloned in time", "microvm", id)
			drop = append(drop, r.v)
			delete(p.reserved, id)
		}
	}
	p.mu.Unlock()
	for _, v := range drop {
		v.discardPooled()
	}
}

// fillOne starts one process for the emptiest pool below size; false when
// every pool is full.
func (p *pool) fillOne() bool {
	p.mu.Lock()
	for _, r := range p.reserved {
		if time.Since(r.at) < reserveQuiet {
			// A clone is on its way (ReservePooled): refill after it.
			p.mu.Unlock()
			return false
		}
	}
	var tp *tmplPool
	for _, x := range p.pools {
		if len(x.ready) < p.size && x.failed < 3 && (tp == nil || len(x.ready) < len(tp.ready)) {
			tp = x
		}
	}
	if tp == nil {
		p.mu.Unlock()
		return false
	}
	key, t := tp.key, tp.t
	p.mu.Unlock()
	// Closing the driver must not wait out a whole restore.
	ctx, cancel := context.WithTimeout(context.Background(), restoreTimeout)
	go func() {
		select {
		case <-p.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	v, err := p.d.spawnPooled(ctx, t, key.mac)
	cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	cur := p.pools[key.dir]
	if err != nil {
		p.d.log.Warn("clone pool: starting a process ahead failed", "template", key.dir, "err", err)
		if cur == tp {
			tp.failed++
		}
		return true
	}
	if cur != tp || cur.key != key || len(tp.ready) >= p.size {
		go v.discardPooled() // drained or shrunk meanwhile
		return true
	}
	tp.failed = 0
	tp.ready = append(tp.ready, v)
	return true
}

// take hands out a pooled process of template t (nil if none is ready) and
// asks for a refill; the first clone of a template starts its pool.
func (p *pool) take(t vmm.Template, mac string) *vm {
	key, err := templateKey(t, mac)
	if err != nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	tp := p.pools[t.Dir]
	if tp != nil && tp.key != key {
		for _, v := range tp.ready {
			go v.discardPooled()
		}
		tp = nil
	}
	if tp == nil {
		tp = &tmplPool{key: key, t: t}
		p.pools[t.Dir] = tp
	}
	tp.lastUse = time.Now()
	tp.failed = 0
	if p.size == 0 {
		return nil
	}
	for len(tp.ready) > 0 {
		v := tp.ready[0]
		tp.ready = tp.ready[1:]
		if v.proc.alive() {
			return v
		}
		go v.discardPooled()
	}
	return nil
}

// SetPoolSize changes how many processes per template are started ahead;
// 0 kills the waiting ones and starts no more (templates already seen
// are remembered, so a later size refills them at once).
func (d *Driver) SetPoolSize(n int) {
	p := d.pool
	p.mu.Lock()
	p.size = max(n, 0)
	var drop []*vm
	for _, tp := range p.pools {
		for len(tp.ready) > p.size {
			drop = append(drop, tp.ready[len(tp.ready)-1])
			tp.ready = tp.ready[:len(tp.ready)-1]
		}
	}
	p.mu.Unlock()
	for _, v := range drop {
		v.discardPooled()
	}
	p.poke()
}

// drain kills the pooled processes of template dir (all if dir is "").
func (p *pool) drain(dir string) {
	p.mu.Lock()
	var drop []*vm
	for k, tp := range p.pools {
		if dir == "" || k == dir {
			drop = append(drop, tp.ready...)
			delete(p.pools, k)
		}
	}
	for id, r := range p.reserved {
		if dir == "" || r.key.dir == dir {
			drop = append(drop, r.v)
			delete(p.reserved, id)
		}
	}
	p.mu.Unlock()
	for _, v := range drop {
		v.discardPooled()
	}
}

// lost forgets a pooled process that died by itself.
func (p *pool) lost(v *vm) {
	p.mu.Lock()
	for _, tp := range p.pools {
		for i, x := range tp.ready {
			if x == v {
				tp.ready = append(tp.ready[:i], tp.ready[i+1:]...)
				break
			}
		}
	}
	for id, r := range p.reserved {
		if r.v == v {
			delete(p.reserved, id)
		}
	}
	p.mu.Unlock()
	v.discardPooled()
}

// live lists the pooled processes, waiting or reserved, by PID with
// their directory's name: Recover must not take them for strays.
func (p *pool) live() map[int]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := map[int]string{}
	for _, tp := range p.pools {
		for _, v := range tp.ready {
			out[v.proc.pid] = filepath.Base(v.dir)
		}
	}
	for _, r := range p.reserved {
		out[r.v.proc.pid] = filepath.Base(r.v.dir)
	}
	return out
}

// claim takes VM id's reservation.
func (p *pool) claim(id string) *reservation {
	p.mu.Lock()
	defer p.mu.Unlock()
	r := p.reserved[id]
	delete(p.reserved, id)
	return r
}

// ReservePooled implements vmm.PoolReserver.
func (d *Driver) ReservePooled(template, id, mac string) (*os.File, bool) {
	if d.pool == nil || !idRe.MatchString(id) {
		return nil, false
	}
	t, err := LoadTemplate(template)
	if err != nil || !t.HasNet || d.checkPlatform("template "+t.Dir, t.Platform) != nil {
		return nil, false
	}
	key, err := templateKey(t, mac)
	if err != nil {
		return nil, false
	}
	v := d.pool.take(t, mac)
	if v == nil {
		return nil, false
	}
	d.pool.mu.Lock()
	old := d.pool.reserved[id]
	d.pool.reserved[id] = &reservation{v: v, key: key, at: time.Now()}
	d.pool.mu.Unlock()
	if old != nil {
		go old.v.discardPooled()
	}
	// No refill yet: it would compete with this VM's network set-up and
	// clone for the CPU; the clone asks for it when done.
	return v.poolNS, true
}

// ReleasePooled implements vmm.PoolReserver.
func (d *Driver) ReleasePooled(id string) {
	if d.pool == nil {
		return
	}
	if r := d.pool.claim(id); r != nil {
		r.v.discardPooled()
		d.pool.poke()
	}
}

// Size reports how many pooled processes wait for template dir.
func (d *Driver) PoolSize(dir string) int {
	if d.pool == nil {
		return 0
	}
	d.pool.mu.Lock()
	defer d.pool.mu.Unlock()
	if tp := d.pool.pools[dir]; tp != nil {
		return len(tp.ready)
	}
	return 0
}

// PooledPIDs lists the host PIDs of the pooled QEMU processes.
func (d *Driver) PooledPIDs() []int {
	if d.pool == nil {
		return nil
	}
	var out []int
	for pid := range d.pool.live() {
		out = append(out, pid)
	}
	return out
}

// DrainPool kills the processes started ahead for template dir: call it
// when a template is removed (the pool notices by itself within seconds).
func (d *Driver) DrainPool(dir string) {
	if d.pool == nil {
		return
	}
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	d.pool.drain(dir)
}

func (p *pool) close() {
	select {
	case <-p.stop:
		return
	default:
	}
	close(p.stop)
	<-p.done
	p.drain("")
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// spawnPooled starts a process for template t ahead of time: its own uid,
// jail, cgroup and (empty) network namespace first, then the template's
// device state.
func (d *Driver) spawnPooled(ctx context.Context, t vmm.Template, mac string) (*vm, error) {
	name := "pool-" + randHex(6)
	v := &vm{d: d, id: name, dir: filepath.Join(d.poolDir(), name), log: d.log.With("pooled", name), pooled: true}
	d.mu.Lock()
	v.uid = d.pickUID()
	d.poolUIDs[v.uid] = true
	d.mu.Unlock()
	v.meta = meta{ID: name, State: vmm.StateRunning, Phase: phaseBooting, MemoryMiB: t.MemoryMiB, VCPUs: t.VCPUs,
		Platform: t.Platform, Template: t.Dir, MemPrivate: true, Hostname: name, StartedAt: time.Now(),
		UID: v.uid, Cgroup: d.cgroupName(name)}
	ok := false
	defer func() {
		if !ok {
			v.discardPooled()
		}
	}()
	if err := os.MkdirAll(v.dir, 0o700); err != nil {
		return nil, err
	}
	if err := v.prepareClone(ctx, t); err != nil {
		return nil, err
	}
	if t.HasNet {
		// Its TAP is persistent: after the clone it is the VM's tap0,
		// which a resume opens again by name after this QEMU has gone.
		ns, err := netns.NewSpare()
		if err != nil {
			return nil, err
		}
		v.poolNS = ns
		tap, err := openTap("/proc/self/fd/"+strconv.Itoa(int(ns.Fd())), netns.TapName)
		if err != nil {
			return nil, err
		}
		v.poolTap = tap
		v.meta.Net = &vmm.NetAttachment{Tap: netns.TapName, MAC: mac}
	}
	if err := v.saveMeta(); err != nil {
		return nil, err
	}
	if err := v.spawn(ctx, true); err != nil {
		return nil, err
	}
	conn, err := v.dialAgent(ctx, restoreTimeout)
	if err != nil {
		return nil, err
	}
	lctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := loadDeviceState(lctx, v.qmp, filepath.Join(t.Dir, "state")); err != nil {
		conn.Close()
		return nil, v.exitError("loading device state", err, v.proc)
	}
	// Run the guest now, with its workloads still frozen (a plain hello
	// does not thaw them): a restored guest under TCG translates its
	// kernel's and agent's code anew, which was most of a clone's time.
	// Done here, the clone itself only refreshes the identity (which
	// reseeds, sets the clock and hostname, then thaws). Its TAP is in
	// its spare namespace: nothing the guest sends goes anywhere.
	if err := v.qmp.Execute(lctx, "cont", nil, nil); err != nil {
		conn.Close()
		return nil, v.exitError("starting the guest", err, v.proc)
	}
	if err := v.handshake(ctx, conn, restoreTimeout, false); err != nil {
		return nil, err
	}
	ok = true
	return v, nil
}

// discardPooled ends a pooled process and removes what it had.
func (v *vm) discardPooled() {
	v.mu.Lock()
	p := v.proc
	v.expectExit = true
	v.mu.Unlock()
	if p != nil {
		p.kill()
		p.waitExit(5 * time.Second)
	}
	v.detach()
	v.closePoolNet()
	os.RemoveAll(v.dir)
	if p == nil {
		v.removeCgroup()
	}
	v.d.mu.Lock()
	delete(v.d.poolUIDs, v.uid)
	v.d.mu.Unlock()
}

// closePoolNet lets go of a pooled process's TAP and spare namespace. The
// namespace (and the persistent TAP in it) ends with its last user: this
// file, the QEMU, or the VM network's name (netns.Config.Spare).
func (v *vm) closePoolNet() {
	if v.poolTap != nil {
		v.poolTap.Close()
		v.poolTap = nil
	}
	if v.poolNS != nil {
		v.poolNS.Close()
		v.poolNS = nil
	}
}

// sameNetns reports whether the namespace at path is ns.
func sameNetns(path string, ns *os.File) bool {
	var a, b unix.Stat_t
	if ns == nil || unix.Stat(path, &a) != nil || unix.Fstat(int(ns.Fd()), &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}

// cloneFromPool turns pooled process v, whose guest runs with frozen
// workloads, into VM spec.ID: its directory, its VM network, then the
// identity refresh that thaws the workloads.
func (d *Driver) cloneFromPool(ctx context.Context, spec vmm.CloneSpec, v *vm) (vmm.Info, error) {
	c := newPhaseClock()
	ph := StartPhases{Pooled: true}
	if err := d.adoptPooled(spec.ID, v); err != nil {
		v.discardPooled()
		return vmm.Info{}, err
	}
	defer v.op.Unlock()
	defer v.closePoolNet()
	fail := func(err error) (vmm.Info, error) {
		v.destroy()
		return vmm.Info{}, fmt.Errorf("cloning %s: %w", spec.ID, err)
	}
	v.mu.Lock()
	v.meta.ID, v.meta.Net, v.meta.Hostname, v.meta.StartedAt = spec.ID, spec.Net, hostnameOr(spec.Hostname, spec.ID), time.Now()
	v.mu.Unlock()
	c.lap(&ph.Prepare)
	if spec.Net != nil && !sameNetns(spec.Net.Netns, v.poolNS) {
		if err := netns.AdoptTap(ctx, spec.Net.Netns, v.poolNS); err != nil {
			return fail(err)
		}
	}
	c.lap(&ph.Network)
	v.console = newRing(64 << 10)
	go v.console.drain(v.sockPath("console.sock"), v.proc.done, d.consoleSink(v.id))
	// Not flushed (an fsync took up to hundreds of ms on a busy host):
	// this record matters only while the process lives. After a host
	// crash the process is gone, and Recover removes a running VM, or
	// one whose record is torn or still names the pooled process, alike;
	// its disk had no state worth keeping, as a suspended VM's has.
	v.mu.Lock()
	v.meta.State, v.meta.Phase = vmm.StateRunning, ""
	v.mu.Unlock()
	if err := v.writeMeta(false); err != nil {
		return fail(err)
	}
	c.lap(&ph.Record)
	if err := v.refreshIdentity(ctx); err != nil {
		return fail(v.exitError("refreshing the guest's identity", err, v.proc))
	}
	c.lap(&ph.Agent)
	v.mu.Lock()
	v.phases, v.phasesSet = ph, true
	v.mu.Unlock()
	return v.info(), nil
}

// adoptPooled registers pooled process v as VM id: its directory moves
// from DATA_DIR/pool to DATA_DIR/vms (its jail root, cgroup and uid go
// with it). It returns with v.op held.
func (d *Driver) adoptPooled(id string, v *vm) error {
	if !idRe.MatchString(id) {
		return fmt.Errorf("vm id %q: use 1-63 lowercase letters, digits or '-': %w", id, errdefs.ErrInvalid)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.vms[id]; ok {
		return fmt.Errorf("vm %s already exists: %w", id, errdefs.ErrConflict)
	}
	dir := filepath.Join(d.vmsDir(), id)
	if _, err := os.Stat(dir); err == nil {
		return fmt.Errorf("vm %s: its directory already exists: %w", id, errdefs.ErrConflict)
	}
	if err := os.Rename(v.dir, dir); err != nil {
		return fmt.Errorf("taking a pooled process: %w", err)
	}
	v.op.Lock()
	v.mu.Lock()
	v.id, v.dir, v.log, v.pooled = id, dir, d.log.With("microvm", id), false
	v.mu.Unlock()
	delete(d.poolUIDs, v.uid)
	d.vms[id] = v
	return nil
}

// resumeLoaded starts a guest whose device state is loaded: record
// "running" first (from `cont` on the guest writes its memory), then
// `cont`, then the agent handshake with the new identity.
func (v *vm) resumeLoaded(ctx context.Context, conn net.Conn, c *phaseClock, ph *StartPhases) error {
	if err := v.setState(vmm.StateRunning, ""); err != nil {
		conn.Close()
		return err
	}
	c.lap(&ph.Record)
	cctx, cancel := context.WithTimeout(ctx, stateTimeout)
	defer cancel()
	if err := v.qmp.Execute(cctx, "cont", nil, nil); err != nil {
		conn.Close()
		return v.exitError("starting the guest", err, v.proc)
	}
	c.lap(&ph.Resume)
	if err := v.handshake(ctx, conn, restoreTimeout, true); err != nil {
		return err
	}
	c.lap(&ph.Agent)
	v.mu.Lock()
	v.phases, v.phasesSet = *ph, true
	v.mu.Unlock()
	v.log.Debug("start phases", "pooled", ph.Pooled, "phases", fmt.Sprintf("%+v", *ph))
	return nil
}

// removePoolLeftovers removes DATA_DIR/pool entries that no live pooled
// process of this driver owns (a kiln that died left them; their
// processes were killed as strays by then).
func (d *Driver) removePoolLeftovers(live map[string]bool) {
	entries, err := os.ReadDir(d.poolDir())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("reading the clone pool directory", "err", err)
		}
		return
	}
	for _, e := range entries {
		if live[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(d.poolDir(), e.Name())); err != nil {
			d.log.Warn("removing a clone pool leftover", "dir", e.Name(), "err", err)
		}
	}
}
