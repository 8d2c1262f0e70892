//go:build linux

package image

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/http"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/image/dockerfile"
	"github.com/kiln-sandbox/kiln/internal/image/layer"
	"github.com/kiln-sandbox/kiln/internal/rootfs"
	"github.com/moby/patternmatcher"
)

// srcMatch is one source of a COPY/ADD after glob expansion.
type srcMatch struct {
	name    string // relative to the source root
	url     string // ADD of a URL
	archive bool   // ADD of a local archive: unpacked, not copied
}

func isURL(s string) bool {
	return strings.HasPrefix(s, "http://") || strings.HasPrefix(s, "https://")
}

// copy runs a COPY or ADD step on the stage's root folder.
func (bd *build) copy(ctx context.Context, st *stageState, s dockerfile.Step) (bool, error) {
	var chmod *fs.FileMode
	if s.Chmod != "" {
		m, err := strconv.ParseUint(s.Chmod, 8, 32)
		if err != nil || m > 0o7777 {
			return false, fmt.Errorf("%w: --chmod=%s: only octal modes of up to 7777 are supported", ErrInvalid, s.Chmod)
		}
		chmod = new(octalMode(m))
	}
	// The source root: the build context, or an earlier stage's root.
	var src *os.Root
	fromKey := "context"
	if s.FromIdx >= 0 {
		from := bd.stages[s.FromIdx]
		dir, err := bd.stageFolder(ctx, from)
		if err != nil {
			return false, err
		}
		r, err := os.OpenRoot(dir)
		if err != nil {
			return false, err
		}
		defer r.Close()
		src, fromKey = r, "stage:"+from.key
	} else {
		src = bd.ctxRoot
	}
	exclude, err := bd.excluder(s, s.FromIdx < 0)
	if err != nil {
		return false, err
	}
	var matches []srcMatch
	for _, p := range s.Sources {
		if s.Kind == dockerfile.Add && isURL(p) {
			matches = append(matches, srcMatch{url: p})
			continue
		}
		name, err := layer.CleanName(p, true)
		if err != nil {
			return false, fmt.Errorf("%w: source %q: %v", ErrInvalid, p, err)
		}
		found, err := fs.Glob(src.FS(), name)
		if err != nil {
			return false, fmt.Errorf("%w: source %q: %v", ErrInvalid, p, err)
		}
		if name == "." {
			found = []string{"."}
		}
		kept := found[:0]
		for _, f := range found {
			if f == "." || !exclude(f, false) {
				kept = append(kept, f)
			}
		}
		if len(kept) == 0 {
			return false, fmt.Errorf("%w: %s source %q: no such file in the %s", ErrInvalid, s.Kind, p, where(s))
		}
		for _, f := range kept {
			matches = append(matches, srcMatch{name: f})
		}
	}
	// Key: parent, instruction, and the content of every source.
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%s\n%s\n%s\n%s\n", s.Kind, fromKey, s.Dest, s.Chown, s.Chmod, orRoot(st.cfg.WorkingDir))
	fmt.Fprintf(h, "%q\n%s\n", s.Exclude, s.Checksum)
	limits := bd.limits()
	var need treeSize
	for i := range matches {
		m := &matches[i]
		if m.url != "" {
			// URLs are keyed by address (and checksum), not content:
			// re-downloading to compare would cost what the cache saves.
			fmt.Fprintf(h, "url %s\n", m.url)
			need.add(bd.maxAddBytes(), 1)
			continue
		}
		if err := hashTree(ctx, h, src, m.name, exclude, &need, limits); err != nil {
			return false, err
		}
		m.archive = s.Kind == dockerfile.Add && s.FromIdx < 0 && isArchiveFile(ctx, src, m.name)
		if m.archive {
			// What an archive unpacks to is known only once it is
			// unpacked: room for ten times its size, within the limits.
			fi, err := src.Stat(m.name)
			if err != nil {
				return false, err
			}
			need.add(min(limits.MaxTotalBytes, 10*fi.Size()), min(int64(limits.MaxEntries), 10_000))
		}
	}
	key := keyOf(st.key, string(s.Kind), hex.EncodeToString(h.Sum(nil)))
	if dir, kind, ok := bd.cache.lookup(key); ok {
		bd.logf("  cached")
		st.advance(key, dir, kind)
		return true, nil
	}
	// Sizes come from the source, which may be a disk a build VM wrote
	// (a sparse file claiming terabytes): never plan for more than the
	// copy limits allow.
	need.bytes = min(max(need.bytes, 0), limits.MaxTotalBytes)
	need.entries = min(max(need.entries, 0), int64(limits.MaxEntries))
	dst, mnt, err := bd.privateRoot(ctx, st, need)
	if err != nil {
		return false, err
	}
	if mnt != nil {
		defer mnt.Close()
	}
	dr, err := os.OpenRoot(dst)
	if err != nil {
		return false, err
	}
	defer dr.Close()
	owner := &layer.Owner{}
	keepOwners := false
	if s.Chown != "" {
		uid, gid, err := lookupUser(dr, s.Chown)
		if err != nil {
			return false, fmt.Errorf("--chown=%s: %w", s.Chown, err)
		}
		owner = &layer.Owner{UID: int(uid), GID: int(gid)}
	} else if s.FromIdx >= 0 {
		owner, keepOwners = nil, true
	}
	dest := s.Dest
	if !path.IsAbs(dest) {
		trailing := strings.HasSuffix(dest, "/") || dest == "."
		dest = path.Join(orRoot(st.cfg.WorkingDir), dest)
		if trailing {
			dest += "/"
		}
	}
	destDir := strings.HasSuffix(dest, "/") || len(matches) > 1
	destName, err := layer.CleanName(dest, true)
	if err != nil {
		return false, fmt.Errorf("%w: destination %q: %v", ErrInvalid, s.Dest, err)
	}
	// Resolve links in the destination as the guest would (an absolute
	// link means the root being built, not the host).
	if destName, err = resolveDest(dr, destName); err != nil {
		return false, err
	}
	if !destDir {
		if fi, err := dr.Stat(destName); err == nil && fi.IsDir() {
			destDir = true
		}
	}
	opts := layer.CopyOptions{
		Options: layer.Options{Rootfs: true, Owner: owner, KeepOwners: keepOwners, Limits: limits,
			Skipped: func(name, why string) { bd.log.Debug("skipped entry", "name", name, "why", why) }},
		Exclude: nil,
		Mode:    chmod,
	}
	for _, m := range matches {
		if m.url != "" {
			if err := bd.addURL(ctx, dr, m.url, destName, destDir, s.Checksum, owner, chmod); err != nil {
				return false, err
			}
			continue
		}
		fi, err := src.Stat(m.name)
		if err != nil {
			return false, fmt.Errorf("%s source %q: %w", s.Kind, m.name, err)
		}
		base := m.name
		opts.Exclude = func(rel string, isDir bool) bool {
			return exclude(path.Join(base, rel), isDir)
		}
		switch {
		case fi.IsDir():
			if err := layer.CopyTree(ctx, src, m.name, dr, destName, opts); err != nil {
				return false, err
			}
		case m.archive:
			if err := dr.MkdirAll(destName, 0o755); err != nil && destName != "." {
				return false, err
			}
			if err := bd.untar(ctx, src, m.name, dr, destName, limits); err != nil {
				return false, err
			}
		default:
			target := destName
			if destDir {
				target = path.Join(destName, path.Base(m.name))
			}
			if err := layer.CopyTree(ctx, src, m.name, dr, target, opts); err != nil {
				return false, err
			}
		}
	}
	kind, stored := kindFolder, dst
	if mnt != nil {
		// The mount must be gone, and the image written back, before the
		// disk is stored.
		dr.Close()
		if err := mnt.Close(); err != nil {
			return false, err
		}
		kind, stored = kindDisk, st.root.priv
	}
	dir, err := bd.cache.store(ctx, key, s.Original, stored, kind)
	if err != nil {
		return false, err
	}
	st.key = key
	st.root.entry, st.root.entryKind = dir, kind
	return false, nil
}

// resolveDest resolves the links in every component of dest but the last
// one, which a copied file replaces, and the last one too when it is a
// link to a folder (the copy goes into that folder).
func resolveDest(dr *os.Root, dest string) (string, error) {
	if dest == "." {
		return dest, nil
	}
	parent, err := layer.ResolveInRoot(dr, path.Dir(dest))
	if err != nil {
		return "", err
	}
	out := path.Join(parent, path.Base(dest))
	if full, err := layer.ResolveInRoot(dr, out); err == nil && full != out {
		if fi, err := dr.Stat(full); err == nil && fi.IsDir() {
			return full, nil
		}
	}
	return out, nil
}

func where(s dockerfile.Step) string {
	if s.FromIdx >= 0 {
		return "stage " + s.From
	}
	return "code package (or excluded by .dockerignore)"
}

// excluder combines .dockerignore (context sources only) and --exclude.
func (bd *build) excluder(s dockerfile.Step, fromContext bool) (func(string, bool) bool, error) {
	var pm *patternmatcher.PatternMatcher
	if len(s.Exclude) > 0 {
		var err error
		pm, err = patternmatcher.New(s.Exclude)
		if err != nil {
			return nil, fmt.Errorf("%w: --exclude: %v", ErrInvalid, err)
		}
	}
	return func(rel string, isDir bool) bool {
		if fromContext && bd.ignore.Excluded(rel, isDir) {
			return true
		}
		if pm != nil {
			if m, _ := pm.MatchesOrParentMatches(rel); m {
				return true
			}
		}
		return false
	}, nil
}

// treeSize is what a copy needs room for.
type treeSize struct{ bytes, entries int64 }

// add saturates instead of overflowing: sizes may come from a hostile disk.
func (t *treeSize) add(bytes, entries int64) {
	t.bytes = satAdd(t.bytes, bytes)
	t.entries = satAdd(t.entries, entries)
}

func satAdd(a, b int64) int64 {
	if b > 0 && a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// hashTree feeds the names, modes, owners and contents under name into h,
// and adds their sizes to sz. The source may be a disk a build VM wrote,
// whose files can claim any size: the copy limits apply before anything
// is read.
func hashTree(ctx context.Context, h io.Writer, src *os.Root, name string, exclude func(string, bool) bool, sz *treeSize, limits layer.Limits) error {
	return fs.WalkDir(src.FS(), name, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p != name && exclude(p, d.IsDir()) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		uid, gid := fileOwner(info)
		fmt.Fprintf(h, "%s %o %d:%d %d\n", p, info.Mode(), uid, gid, info.Size())
		sz.add(info.Size(), 1)
		switch {
		case info.Mode().IsRegular() && info.Size() > limits.MaxEntryBytes:
			return fmt.Errorf("%w: %s is %d bytes, over MaxEntryBytes = %d", layer.ErrLimit, p, info.Size(), limits.MaxEntryBytes)
		case sz.bytes > limits.MaxTotalBytes:
			return fmt.Errorf("%w: the sources are over MaxTotalBytes = %d", layer.ErrLimit, limits.MaxTotalBytes)
		case sz.entries > int64(limits.MaxEntries):
			return fmt.Errorf("%w: the sources have over MaxEntries = %d entries", layer.ErrLimit, limits.MaxEntries)
		}
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			l, err := src.Readlink(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(h, "-> %s\n", l)
		case info.Mode().IsRegular():
			f, err := src.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(h, io.LimitReader(f, info.Size()))
			f.Close()
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// isArchiveFile reports whether ADD unpacks the local file name: as in
// BuildKit, when it starts with a tar header once decompressed. Any other
// file, a gzipped JSON or a text that begins with "BZh", is copied as is.
func isArchiveFile(ctx context.Context, src *os.Root, name string) bool {
	f, err := src.Open(name)
	if err != nil {
		return false
	}
	defer f.Close()
	head := make([]byte, 512)
	n, _ := io.ReadFull(f, head)
	if !layer.IsArchive(head[:n]) {
		return false
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return false
	}
	r, err := layer.Decompress(ctx, f)
	if err != nil {
		return false
	}
	defer r.Close()
	_, err = tar.NewReader(r).Next()
	return err == nil
}

func (bd *build) untar(ctx context.Context, src *os.Root, name string, dst *os.Root, destName string, limits layer.Limits) error {
	f, err := src.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := layer.Decompress(ctx, f)
	if err != nil {
		return err
	}
	defer r.Close()
	sub := dst
	if destName != "." {
		sub, err = dst.OpenRoot(destName)
		if err != nil {
			return err
		}
		defer sub.Close()
	}
	if err := layer.ExtractTarRoot(ctx, r, sub, layer.Options{Rootfs: true, KeepOwners: true, Limits: limits}); err != nil {
		return fmt.Errorf("ADD %s: unpacking: %w", name, err)
	}
	return nil
}

// addURL downloads an ADD URL into the root: bounded, with a timeout, and
// checked against --checksum when given.
func (bd *build) addURL(ctx context.Context, dr *os.Root, rawURL, destName string, destDir bool, checksum string, owner *layer.Owner, chmod *fs.FileMode) error {
	u, err := url.Parse(rawURL)
	if err != nil {
		return fmt.Errorf("%w: ADD %s: %v", ErrInvalid, rawURL, err)
	}
	target := destName
	if destDir {
		base := path.Base(u.Path)
		if base == "/" || base == "." || base == "" {
			return fmt.Errorf("%w: ADD %s: cannot name the file from the URL; give a file name as destination", ErrInvalid, rawURL)
		}
		target = path.Join(destName, base)
	}
	client := bd.b.HTTPClient
	if client == nil {
		client = (&egress.Policy{}).Client(10 * time.Minute)
	}
	max := bd.maxAddBytes()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("ADD %s: %w", u.Redacted(), egress.Tenant(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("ADD %s: %s", u.Redacted(), resp.Status)
	}
	if resp.ContentLength > max {
		return fmt.Errorf("%w: ADD %s: %d bytes is over MaxAddBytes = %d", layer.ErrLimit, u.Redacted(), resp.ContentLength, max)
	}
	if dir := path.Dir(target); dir != "." {
		if err := dr.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	_ = dr.Remove(target)
	f, err := dr.OpenFile(target, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("ADD %s: %w", u.Redacted(), err)
	}
	hs := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, hs), io.LimitReader(resp.Body, max+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("ADD %s: %w", u.Redacted(), err)
	}
	if n > max {
		return fmt.Errorf("%w: ADD %s: over MaxAddBytes = %d", layer.ErrLimit, u.Redacted(), max)
	}
	if checksum != "" {
		want, ok := strings.CutPrefix(checksum, "sha256:")
		if !ok {
			return fmt.Errorf("%w: ADD --checksum=%s: only sha256: is supported", ErrInvalid, checksum)
		}
		if got := hex.EncodeToString(hs.Sum(nil)); got != want {
			return fmt.Errorf("ADD %s: checksum mismatch: got sha256:%s, want sha256:%s", u.Redacted(), got, want)
		}
	}
	if owner != nil && os.Geteuid() == 0 {
		if err := dr.Lchown(target, owner.UID, owner.GID); err != nil {
			return err
		}
	}
	if chmod != nil {
		// After chown, which clears setuid bits.
		return dr.Chmod(target, *chmod)
	}
	return nil
}

// octalMode is a mode as chmod(1) writes it (04755) as an fs.FileMode,
// whose setuid, setgid and sticky flags are not those octal bits.
func octalMode(m uint64) fs.FileMode {
	mode := fs.FileMode(m & 0o777)
	for bit, flag := range map[uint64]fs.FileMode{0o4000: fs.ModeSetuid, 0o2000: fs.ModeSetgid, 0o1000: fs.ModeSticky} {
		if m&bit != 0 {
			mode |= flag
		}
	}
	return mode
}

// stageFolder returns a folder with an earlier stage's final root, for
// COPY --from. It is read-only to the caller.
func (bd *build) stageFolder(ctx context.Context, st *stageState) (string, error) {
	if st.folder != "" {
		return st.folder, nil
	}
	r := st.root
	switch {
	case r.priv != "" && r.privKind == kindFolder:
		st.folder = r.priv
	case r.entry == "":
		st.folder = bd.tmpName("empty")
		if err := os.Mkdir(st.folder, 0o755); err != nil {
			return "", err
		}
	case r.entryKind == kindFolder:
		st.folder = filepath.Join(r.entry, "rootfs")
	default:
		m, err := bd.mount(ctx, filepath.Join(r.entry, "root.ext4"), true)
		if err != nil {
			return "", err
		}
		st.folder = m.Dir
	}
	return st.folder, nil
}

// resolveUser turns USER (name, uid, name:group, uid:gid) into numeric ids
// with the root's /etc/passwd and /etc/group, as docker does at RUN time.
func (bd *build) resolveUser(ctx context.Context, st *stageState, user string) (uid, gid uint32, err error) {
	if user == "" {
		return 0, 0, nil
	}
	r := st.root
	var read func(p string) ([]byte, error)
	switch {
	case r.priv != "" && r.privKind == kindFolder:
		read = folderReader(r.priv)
	case r.priv != "":
		read = func(p string) ([]byte, error) { return rootfs.ReadFile(ctx, r.priv, "/"+p, maxIDFile) }
	case r.entry == "":
		read = func(string) ([]byte, error) { return nil, fs.ErrNotExist }
	case r.entryKind == kindFolder:
		read = folderReader(filepath.Join(r.entry, "rootfs"))
	default:
		disk := filepath.Join(r.entry, "root.ext4")
		read = func(p string) ([]byte, error) { return rootfs.ReadFile(ctx, disk, "/"+p, maxIDFile) }
	}
	return resolveIDs(read, user)
}

// maxIDFile bounds what kiln reads of an image's /etc/passwd and
// /etc/group: a build wrote them, and one made it read a sparse 4 TiB file.
const maxIDFile = 1 << 20

func folderReader(dir string) func(string) ([]byte, error) {
	return func(p string) ([]byte, error) {
		r, err := os.OpenRoot(dir)
		if err != nil {
			return nil, err
		}
		defer r.Close()
		return readIDFile(r, p)
	}
}

func lookupUser(r *os.Root, spec string) (uid, gid uint32, err error) {
	return resolveIDs(func(p string) ([]byte, error) { return readIDFile(r, p) }, spec)
}

// readIDFile reads a passwd or group file of a root folder, refusing one
// over maxIDFile.
func readIDFile(r *os.Root, p string) ([]byte, error) {
	f, err := r.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: /%s in the image is not a regular file", ErrInvalid, p)
	}
	if fi.Size() > maxIDFile {
		return nil, fmt.Errorf("%w: /%s in the image is %d bytes; kiln reads at most 1 MiB", ErrInvalid, p, fi.Size())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxIDFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxIDFile {
		return nil, fmt.Errorf("%w: /%s in the image is over 1 MiB; kiln reads at most 1 MiB", ErrInvalid, p)
	}
	return b, nil
}

// readIDFiles reads passwd and group with read; a missing file is empty,
// any other failure (one too large among them) fails the lookup.
func readIDFiles(read func(string) ([]byte, error)) (passwd, group []byte, err error) {
	for _, x := range []struct {
		name string
		dst  *[]byte
	}{{"etc/passwd", &passwd}, {"etc/group", &group}} {
		b, err := read(x.name)
		var tooLarge *rootfs.TooLargeError
		switch {
		case errors.As(err, &tooLarge):
			// The message names the file and the bound already.
			return nil, nil, fmt.Errorf("%w (USER looks the user up in it: keep it a plain /%s file)", err, x.name)
		case err != nil && !errors.Is(err, fs.ErrNotExist):
			return nil, nil, fmt.Errorf("reading the image's /%s: %w", x.name, err)
		}
		*x.dst = b
	}
	return passwd, group, nil
}

// resolveIDs resolves "user[:group]" against passwd and group files read
// by read ("etc/passwd", "etc/group").
func resolveIDs(read func(string) ([]byte, error), spec string) (uid, gid uint32, err error) {
	userPart, groupPart, hasGroup := strings.Cut(spec, ":")
	passwd, groupFile, err := readIDFiles(read)
	if err != nil {
		return 0, 0, err
	}
	if n, perr := strconv.ParseUint(userPart, 10, 32); perr == nil {
		uid = uint32(n)
		gid = uid
		// A numeric uid in passwd also gives its primary group.
		for _, f := range colonFile(passwd) {
			if len(f) >= 4 && f[2] == userPart {
				if g, err := strconv.ParseUint(f[3], 10, 32); err == nil {
					gid = uint32(g)
				}
				break
			}
		}
	} else {
		found := false
		for _, f := range colonFile(passwd) {
			if len(f) >= 4 && f[0] == userPart {
				u, err1 := strconv.ParseUint(f[2], 10, 32)
				g, err2 := strconv.ParseUint(f[3], 10, 32)
				if err1 != nil || err2 != nil {
					return 0, 0, fmt.Errorf("bad /etc/passwd entry for %q", userPart)
				}
				uid, gid, found = uint32(u), uint32(g), true
				break
			}
		}
		if !found {
			return 0, 0, fmt.Errorf("%w: user %q not found in the image's /etc/passwd (create it in an earlier RUN, or use a numeric uid)", ErrInvalid, userPart)
		}
	}
	if hasGroup {
		if n, perr := strconv.ParseUint(groupPart, 10, 32); perr == nil {
			gid = uint32(n)
		} else {
			found := false
			for _, f := range colonFile(groupFile) {
				if len(f) >= 3 && f[0] == groupPart {
					g, err := strconv.ParseUint(f[2], 10, 32)
					if err != nil {
						return 0, 0, fmt.Errorf("bad /etc/group entry for %q", groupPart)
					}
					gid, found = uint32(g), true
					break
				}
			}
			if !found {
				return 0, 0, fmt.Errorf("%w: group %q not found in the image's /etc/group", ErrInvalid, groupPart)
			}
		}
	}
	return uid, gid, nil
}

func colonFile(b []byte) [][]string {
	var out [][]string
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	return out
}

func fileOwner(fi fs.FileInfo) (int, int) { return statOwner(fi) }
