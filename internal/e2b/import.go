package e2b

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Older kilns kept the E2B API's tags, template builds and snapshot
// records as files under TemplatesDir, each server its own. ImportFiles
// moves them into the store once, so that upgrading a single `kiln
// server` loses none: each file imported is renamed NAME.imported (kept
// for the operator to delete), and one that cannot be read is logged and
// left where it is. The layouts are those of the older kilns:
//
//	tags/ACCOUNT/TEMPLATE.json          [{tag, buildID, version, createdAt}]
//	builds/ACCOUNT/ID.json              {id, template, tags, memoryMB, cpuCount, createdAt, version}
//	versions/ACCOUNT/TEMPLATE/VERSION   the build id that made VERSION
//	snapshots/ACCOUNT/NAME.json         {name, sandboxID, templateID, envVars, createdAt}

// importedSuffix marks a file ImportFiles has moved into the store.
const importedSuffix = ".imported"

// maxImportFile bounds what ImportFiles reads of one file (the older
// kilns' own bound on a tag file).
const maxImportFile = 1 << 20

type oldTag struct {
	Tag       string    `json:"tag"`
	BuildID   string    `json:"buildID"`
	Version   string    `json:"version"`
	CreatedAt time.Time `json:"createdAt"`
}

type oldBuild struct {
	ID        string    `json:"id"`
	Template  string    `json:"template"`
	Tags      []string  `json:"tags"`
	MemoryMB  int64     `json:"memoryMB"`
	CPUCount  int64     `json:"cpuCount"`
	CreatedAt time.Time `json:"createdAt"`
	Version   string    `json:"version"`
}

type oldSnapshot struct {
	Name       string            `json:"name"`
	SandboxID  string            `json:"sandboxID"`
	TemplateID string            `json:"templateID"`
	EnvVars    map[string]string `json:"envVars"`
	CreatedAt  time.Time         `json:"createdAt"`
}

// ImportStats counts what ImportFiles moved into the store.
type ImportStats struct {
	Tags, Builds, Snapshots, Skipped int
}

// ImportFiles moves the records an older kiln kept under TemplatesDir
// into the store; a store error stops it (what was imported is renamed,
// the rest is tried again at the next start).
func (s *Server) ImportFiles(ctx context.Context) (ImportStats, error) {
	var st ImportStats
	if s.cfg.TemplatesDir == "" {
		return st, nil
	}
	// Builds first: a tag's build id is theirs.
	steps := []struct {
		dir   string
		depth int
		fn    func(ctx context.Context, account string, parts []string, data []byte) (bool, error)
		count *int
	}{
		{"builds", 1, s.importBuild, &st.Builds},
		{"versions", 2, s.importVersion, &st.Builds},
		{"tags", 1, s.importTags, &st.Tags},
		{"snapshots", 1, s.importSnapshot, &st.Snapshots},
	}
	for _, step := range steps {
		err := eachOldFile(filepath.Join(s.cfg.TemplatesDir, step.dir), step.depth, func(account string, parts []string, path string) error {
			data, err := readSmall(path)
			if err != nil {
				slog.Warn("e2b import: cannot read an old record; left as it is", "file", path, "err", err)
				st.Skipped++
				return nil
			}
			imported, err := step.fn(ctx, account, parts, data)
			if err != nil {
				if errors.Is(err, errdefs.ErrInvalid) {
					slog.Warn("e2b import: an old record is not valid; left as it is", "file", path, "err", err)
					st.Skipped++
					return nil
				}
				return fmt.Errorf("importing %s: %w", path, err)
			}
			if imported {
				*step.count++
			} else {
				st.Skipped++
			}
			return os.Rename(path, path+importedSuffix)
		})
		if err != nil {
			return st, err
		}
	}
	if st != (ImportStats{}) {
		slog.Info("e2b import: moved the records of an older kiln's data dir into the store", "dir", s.cfg.TemplatesDir,
			"tags", st.Tags, "builds", st.Builds, "snapshots", st.Snapshots, "skipped", st.Skipped)
	}
	return st, nil
}

// eachOldFile calls fn with each file depth levels below ACCOUNT folders
// of dir (the names between, and the file's name without .json), skipping
// those imported already and temporary files.
func eachOldFile(dir string, depth int, fn func(account string, parts []string, path string) error) error {
	accounts, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var walk func(path string, parts []string, left int) error
	walk = func(path string, parts []string, left int) error {
		ents, err := os.ReadDir(path)
		if err != nil {
			return err
		}
		for _, e := range ents {
			p := filepath.Join(path, e.Name())
			if left > 1 {
				if e.IsDir() {
					if err := walk(p, append(parts, e.Name()), left-1); err != nil {
						return err
					}
				}
				continue
			}
			name := e.Name()
			if !e.Type().IsRegular() || strings.HasSuffix(name, importedSuffix) || strings.HasSuffix(name, ".tmp") {
				continue
			}
			if err := fn(filepath.Base(parts[0]), append(parts[1:len(parts):len(parts)], strings.TrimSuffix(name, ".json")), p); err != nil {
				return err
			}
		}
		return nil
	}
	for _, a := range accounts {
		if a.IsDir() {
			if err := walk(filepath.Join(dir, a.Name()), []string{a.Name()}, depth); err != nil {
				return err
			}
		}
	}
	return nil
}

func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxImportFile+1))
	if err == nil && len(data) > maxImportFile {
		err = fmt.Errorf("over %d bytes", maxImportFile)
	}
	return data, err
}

func invalid(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, errdefs.ErrInvalid)...)
}

// imageExists: a record of an image deleted since is not imported.
func (s *Server) imageExists(ctx context.Context, account, name string) (bool, error) {
	_, err := s.cfg.Store.GetImage(ctx, account, name)
	if errors.Is(err, errdefs.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (s *Server) importBuild(ctx context.Context, account string, parts []string, data []byte) (bool, error) {
	var b oldBuild
	if err := json.Unmarshal(data, &b); err != nil {
		return false, invalid("%v", err)
	}
	if b.ID != parts[0] || !buildIDRE.MatchString(b.ID) || !templateNameRE.MatchString(b.Template) {
		return false, invalid("build %q of template %q is not where it should be", b.ID, b.Template)
	}
	if b.Version != "" {
		if ok, err := s.imageExists(ctx, account, b.Template); !ok || err != nil {
			return false, err
		}
	}
	err := s.cfg.Sandboxes.CreateE2BBuild(ctx, store.E2BBuild{ID: b.ID, Account: account, Template: b.Template, Tags: b.Tags,
		MemoryMB: b.MemoryMB, CPUCount: b.CPUCount, Version: b.Version, CreatedAt: b.CreatedAt.UTC()})
	if errors.Is(err, errdefs.ErrConflict) {
		// Imported before a crash left the file unrenamed.
		return false, nil
	}
	return err == nil, err
}

// importVersion keeps a version's build id: a build file imported already
// holds it; one without its build file gets a record of its own.
func (s *Server) importVersion(ctx context.Context, account string, parts []string, data []byte) (bool, error) {
	tid, version, bid := parts[0], parts[1], string(data)
	version, err := url.PathUnescape(version)
	if err != nil || !templateNameRE.MatchString(tid) || !buildIDRE.MatchString(bid) || version == "" {
		return false, invalid("version index of %s:%s names build %q", tid, version, bid)
	}
	if _, err := s.cfg.Sandboxes.E2BBuildOfVersion(ctx, account, tid, version); err == nil || !errors.Is(err, errdefs.ErrNotFound) {
		return false, err
	}
	if ok, err := s.imageExists(ctx, account, tid); !ok || err != nil {
		return false, err
	}
	err = s.cfg.Sandboxes.CreateE2BBuild(ctx, store.E2BBuild{ID: bid, Account: account, Template: tid, Version: version, CreatedAt: s.cfg.Now().UTC()})
	if errors.Is(err, errdefs.ErrConflict) {
		return false, nil
	}
	return err == nil, err
}

func (s *Server) importTags(ctx context.Context, account string, parts []string, data []byte) (bool, error) {
	tid := parts[0]
	var recs []oldTag
	if err := json.Unmarshal(data, &recs); err != nil {
		return false, invalid("%v", err)
	}
	if !templateNameRE.MatchString(tid) {
		return false, invalid("template name %q", tid)
	}
	if ok, err := s.imageExists(ctx, account, tid); !ok || err != nil {
		return false, err
	}
	for _, r := range recs {
		if !tagRE.MatchString(r.Tag) {
			return false, invalid("tag %q", r.Tag)
		}
		// A tag assigned since (through this store) is newer: it stays.
		if _, found, err := s.tagged(ctx, account, tid, r.Tag); found || err != nil {
			if err != nil {
				return false, err
			}
			continue
		}
		if err := s.cfg.Sandboxes.AssignE2BTags(ctx, account, tid, []string{r.Tag}, r.BuildID, r.Version, r.CreatedAt.UTC()); err != nil {
			if errors.Is(err, errdefs.ErrExhausted) {
				return false, invalid("%v", err)
			}
			return false, err
		}
	}
	return true, nil
}

func (s *Server) importSnapshot(ctx context.Context, account string, parts []string, data []byte) (bool, error) {
	var r oldSnapshot
	if err := json.Unmarshal(data, &r); err != nil {
		return false, invalid("%v", err)
	}
	if r.Name != parts[0] || !templateNameRE.MatchString(r.Name) {
		return false, invalid("snapshot %q is not where it should be", r.Name)
	}
	if ok, err := s.imageExists(ctx, account, r.Name); !ok || err != nil {
		return false, err
	}
	return true, s.cfg.Sandboxes.PutE2BSnapshot(ctx, store.E2BSnapshot{Account: account, Name: r.Name, SandboxID: r.SandboxID,
		TemplateID: r.TemplateID, EnvVars: r.EnvVars, CreatedAt: r.CreatedAt.UTC()})
}
