package engine

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// appFile holds a version's AppConfig beside its template pointer.
const appFile = "app.json"

// MaxAppFile bounds what App reads: the file is kiln's own, but its
// contents come from a tenant's Dockerfile.
const MaxAppFile = 1 << 20

// SetApp records how the version's app was started.
func (e *Engine) SetApp(account, image, version string, app AppConfig) error {
	d := e.imageDir(account, image, version)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return err
	}
	data, err := json.Marshal(app)
	if err != nil {
		return err
	}
	tmp := filepath.Join(d, appFile+".tmp")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	if err := syncPath(tmp); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(d, appFile))
}

// App returns how the version's app was started; found is false for a
// version built before kiln recorded it.
func (e *Engine) App(account, image, version string) (app AppConfig, found bool, err error) {
	f, err := os.Open(filepath.Join(e.imageDir(account, image, version), appFile))
	if errors.Is(err, os.ErrNotExist) {
		return app, false, nil
	}
	if err != nil {
		return app, false, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxAppFile+1))
	if err != nil {
		return app, false, err
	}
	if len(data) > MaxAppFile {
		return app, false, fmt.Errorf("%s of %s:%s is over %d bytes", appFile, image, version, MaxAppFile)
	}
	if err := json.Unmarshal(data, &app); err != nil {
		return app, false, fmt.Errorf("reading %s of %s:%s: %w", appFile, image, version, err)
	}
	return app, true, nil
}
