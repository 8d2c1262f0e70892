//go:build linux

package base

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// ErrNotFound marks an unknown managed base or version.
var ErrNotFound = fmt.Errorf("managed base: %w", errdefs.ErrNotFound)

// Debian12 is the name of the managed Debian bookworm base.
const Debian12 = "debian-12"

// recipe is bumped whenever the way a base is built changes, so that a
// new build gets a new version instead of silently differing. Ensure
// builds a version of the current recipe once; older ones stay listed
// (images built on them keep their files) but are no longer picked.
// 2: dpkg's force-unsafe-io and apt's Acquire::Languages "none".
const recipe = "2"

// Version describes one built version of a managed base, stored as
// DATA_DIR/base/NAME/VERSION/manifest.json next to rootfs/.
type Version struct {
	Name      string    `json:"name"`
	Version   string    `json:"version"` // YYYYMMDD.RECIPE.N
	Mirror    string    `json:"mirror"`
	Suite     string    `json:"suite"`
	CreatedAt time.Time `json:"createdAt"`
	SizeBytes int64     `json:"sizeBytes"`
	Dir       string    `json:"-"` // the rootfs folder
}

// Managed builds and caches managed bases under DataDir/base.
type Managed struct {
	DataDir string
	// EtcApt is where the host's apt sources are read; "" = /etc/apt.
	EtcApt string
	Logger *slog.Logger
	// Log, if set, receives debootstrap's output.
	Log io.Writer

	mu sync.Mutex
}

func (m *Managed) dir(name string) string { return filepath.Join(m.DataDir, "base", name) }

// Names lists the managed bases kiln can build.
func (m *Managed) Names() []string { return []string{Debian12} }

// Versions lists the built versions of name, oldest first.
func (m *Managed) Versions(name string) ([]Version, error) {
	if name != Debian12 {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	ents, err := os.ReadDir(m.dir(name))
	if err != nil && !os.IsNotExist(err) {
		return nil, err
	}
	var out []Version
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(m.dir(name), e.Name(), "manifest.json"))
		if err != nil {
			continue // incomplete
		}
		var v Version
		if json.Unmarshal(b, &v) != nil {
			continue
		}
		v.Dir = filepath.Join(m.dir(name), e.Name(), "rootfs")
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// Ensure returns the newest built version of name made by the current
// recipe, building one if none exists. Concurrent callers in this process
// share one build.
func (m *Managed) Ensure(ctx context.Context, name string) (Version, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	vs, err := m.Versions(name)
	if err != nil {
		return Version{}, err
	}
	for i := len(vs) - 1; i >= 0; i-- {
		if recipeOf(vs[i].Version) == recipe {
			return vs[i], nil
		}
	}
	return m.build(ctx, name)
}

// recipeOf returns the RECIPE of a version YYYYMMDD.RECIPE.N, or "".
func recipeOf(version string) string {
	parts := strings.Split(version, ".")
	if len(parts) != 3 {
		return ""
	}
	return parts[1]
}

// Rebuild builds a new version of name (e.g. to pick up security
// updates); older versions stay until removed.
func (m *Managed) Rebuild(ctx context.Context, name string) (Version, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if name != Debian12 {
		return Version{}, fmt.Errorf("%w: %s", ErrNotFound, name)
	}
	return m.build(ctx, name)
}

func (m *Managed) logger() *slog.Logger {
	if m.Logger != nil {
		return m.Logger
	}
	return slog.Default()
}

func (m *Managed) build(ctx context.Context, name string) (Version, error) {
	etc := m.EtcApt
	if etc == "" {
		etc = "/etc/apt"
	}
	sources, err := HostAptSources(etc)
	if err != nil {
		return Version{}, err
	}
	mirror, ok := MirrorFor(sources, "bookworm")
	if !ok {
		return Version{}, fmt.Errorf("building %s: no bookworm source with component main in %s; add your Debian mirror to the host's apt sources", name, etc)
	}
	security, _ := MirrorFor(sources, "bookworm-security")
	deboot, err := exec.LookPath("debootstrap")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/debootstrap"); serr == nil {
			deboot = "/usr/sbin/debootstrap"
		} else {
			return Version{}, fmt.Errorf("building %s: debootstrap is not installed (run `make setup`)", name)
		}
	}
	if os.Geteuid() != 0 {
		return Version{}, fmt.Errorf("building %s: debootstrap needs root", name)
	}
	if err := os.MkdirAll(m.dir(name), 0o755); err != nil {
		return Version{}, err
	}
	tmp, err := os.MkdirTemp(m.dir(name), ".build-")
	if err != nil {
		return Version{}, err
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "rootfs")
	start := time.Now()
	m.logger().Info("building managed base", "name", name, "mirror", mirror)
	var out bytes.Buffer
	var w io.Writer = &out
	if m.Log != nil {
		w = io.MultiWriter(&out, m.Log)
	}
	cmd := exec.CommandContext(ctx, deboot, "--variant=minbase", "--include=ca-certificates", "bookworm", root, mirror)
	cmd.Stdout, cmd.Stderr = w, w
	cmd.Env = append(os.Environ(), "LC_ALL=C.UTF-8")
	if err := cmd.Run(); err != nil {
		// debootstrap's own log holds the failing package.
		tail := lastLines(out.String(), 15)
		if b, rerr := os.ReadFile(filepath.Join(root, "debootstrap", "debootstrap.log")); rerr == nil {
			tail = lastLines(string(b), 15)
		}
		return Version{}, fmt.Errorf("debootstrap %s from %s: %w\n%s", name, mirror, err, tail)
	}
	if err := configure(root, mirror, security); err != nil {
		return Version{}, fmt.Errorf("configuring %s: %w", name, err)
	}
	size, err := duBytes(root)
	if err != nil {
		return Version{}, err
	}
	v := Version{Name: name, Mirror: mirror, Suite: "bookworm", CreatedAt: time.Now().UTC(), SizeBytes: size}
	v.Version = m.nextVersion(name, v.CreatedAt)
	b, _ := json.MarshalIndent(v, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "manifest.json"), b, 0o644); err != nil {
		return Version{}, err
	}
	final := filepath.Join(m.dir(name), v.Version)
	if err := os.Rename(tmp, final); err != nil {
		return Version{}, fmt.Errorf("placing %s %s: %w", name, v.Version, err)
	}
	v.Dir = filepath.Join(final, "rootfs")
	m.logger().Info("built managed base", "name", name, "version", v.Version, "bytes", size, "took", time.Since(start).Round(time.Millisecond))
	return v, nil
}

func (m *Managed) nextVersion(name string, t time.Time) string {
	prefix := t.Format("20060102") + "." + recipe + "."
	for n := 1; ; n++ {
		v := fmt.Sprintf("%s%d", prefix, n)
		if _, err := os.Stat(filepath.Join(m.dir(name), v)); os.IsNotExist(err) {
			return v
		}
	}
}

// configure leaves the root ready for apt-get in a build VM and small:
// the host's mirrors as apt sources, no downloaded packages or lists.
func configure(root, mirror, security string) error {
	var src strings.Builder
	fmt.Fprintf(&src, "Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n", mirror)
	if security != "" {
		fmt.Fprintf(&src, "\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n", security)
	}
	if err := os.MkdirAll(filepath.Join(root, "etc/apt/sources.list.d"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc/apt/sources.list.d/debian.sources"), []byte(src.String()), 0o644); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(root, "etc/apt/sources.list"))
	// As Debian's container images do: no recommends, no caches kept.
	// No translations either: apt-get update fetches and parses only the
	// package lists, which under TCG is much of an apt step's time.
	if err := os.WriteFile(filepath.Join(root, "etc/apt/apt.conf.d/90kiln"), []byte(
		"APT::Install-Recommends \"false\";\nAPT::Install-Suggests \"false\";\nAcquire::Languages \"none\";\n"), 0o644); err != nil {
		return err
	}
	// dpkg without an fsync per unpacked file (as Debian's container
	// images do): a build VM's disk is kept only after a clean shutdown,
	// which syncs, and a step that dies half-way is redone from its input.
	if err := os.MkdirAll(filepath.Join(root, "etc/dpkg/dpkg.cfg.d"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "etc/dpkg/dpkg.cfg.d/90kiln-unsafe-io"), []byte("force-unsafe-io\n"), 0o644); err != nil {
		return err
	}
	for _, glob := range []string{"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*", "var/log/*.log"} {
		ms, _ := filepath.Glob(filepath.Join(root, glob))
		for _, m := range ms {
			os.Remove(m)
		}
	}
	// The guest sets these per VM (kiln-agent refreshes identity after
	// every restore); an empty machine-id makes systemd-less tools happy.
	os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("kiln\n"), 0o644)
	os.WriteFile(filepath.Join(root, "etc/machine-id"), nil, 0o444)
	os.Remove(filepath.Join(root, "etc/resolv.conf"))
	return nil
}

func duBytes(dir string) (int64, error) {
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		n += fi.Size()
		return nil
	})
	return n, err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
