package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// TemplateImport is how a TemplateFetcher hands over a template it got:
// the version's app settings (nil if it has none) and the driver's parts.
type TemplateImport func(app *AppConfig, next func() (vmm.TemplatePart, error)) error

// TemplateFetcher gets an image version's template that this host lacks
// from where it is (a cluster node asks the other nodes) and passes it
// to imp. errdefs.ErrNotFound if nobody has it.
type TemplateFetcher func(ctx context.Context, account, image, version string, imp TemplateImport) error

// resolveTemplate is TemplateFor, fetching the template first when this
// host lacks it and Config.FetchTemplate is set. Fetches of one version
// are not deduplicated beyond the version's directory: a second import
// loses the race to record itself and is removed.
func (e *Engine) resolveTemplate(ctx context.Context, account, image, version string) (string, error) {
	dir, err := e.TemplateFor(account, image, version)
	if err == nil || e.cfg.FetchTemplate == nil || !errors.Is(err, errdefs.ErrNotFound) {
		return dir, err
	}
	porter, ok := e.cfg.Driver.(vmm.TemplatePorter)
	if !ok {
		return "", err
	}
	e.tmplMu.Lock()
	defer e.tmplMu.Unlock()
	if dir, err := e.TemplateFor(account, image, version); err == nil {
		return dir, nil // fetched while this call waited
	}
	ferr := e.cfg.FetchTemplate(ctx, account, image, version, func(app *AppConfig, next func() (vmm.TemplatePart, error)) error {
		vdir := e.imageDir(account, image, version)
		if err := os.MkdirAll(vdir, 0o700); err != nil {
			return err
		}
		b := make([]byte, 6)
		rand.Read(b)
		tdir := filepath.Join(vdir, "fetched-"+hex.EncodeToString(b))
		if _, err := porter.ImportTemplate(ctx, tdir, next); err != nil {
			return err
		}
		if app != nil {
			if err := e.SetApp(account, image, version, *app); err != nil {
				os.RemoveAll(tdir)
				return err
			}
		}
		if err := e.SetTemplate(account, image, version, tdir); err != nil {
			os.RemoveAll(tdir)
			return err
		}
		return nil
	})
	if ferr != nil {
		return "", fmt.Errorf("image %s version %s has no snapshot template on this host, and fetching it failed: %w", image, version, ferr)
	}
	e.log.Info("fetched the template of an image version from another host", "image", image, "version", version)
	return e.TemplateFor(account, image, version)
}

// ExportTemplate sends an image version's template held here: first its
// app settings (nil if none were recorded), then the driver's parts.
func (e *Engine) ExportTemplate(ctx context.Context, account, image, version string, app func(*AppConfig) error, emit func(vmm.TemplatePart) error) error {
	dir, err := e.TemplateFor(account, image, version)
	if err != nil {
		return err
	}
	porter, ok := e.cfg.Driver.(vmm.TemplatePorter)
	if !ok {
		return fmt.Errorf("this host's vm driver cannot export templates: %w", errdefs.ErrInvalid)
	}
	a, found, err := e.App(account, image, version)
	if err != nil {
		return err
	}
	var ap *AppConfig
	if found {
		ap = &a
	}
	if err := app(ap); err != nil {
		return err
	}
	return porter.ExportTemplate(ctx, dir, emit)
}
