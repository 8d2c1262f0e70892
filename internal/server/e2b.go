package server

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/lifecycle"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// e2bTemplatesDir keeps the E2B template files of one host and the
// builds' working folders.
func e2bTemplatesDir(o Options) string { return filepath.Join(o.DataDir, "e2b-templates") }

// mountE2B serves E2B's control API beside the AWS routes on the API
// listener: the SDK needs only a base URL (E2B_API_URL), no path of E2B's
// collides with the AWS API's, and sharing the listener shares its TLS,
// timeouts and per-client connection cap instead of configuring a second.
func mountE2B(ctx context.Context, mux *http.ServeMux, o Options, st store.Store, srv *api.Server, be lifecycle.Backend, endpointPort string, operators []string) error {
	es, ok := st.(store.E2BStore)
	if !ok {
		// A store without E2B sandboxes (both of kiln's have them)
		// serves the AWS API only.
		slog.Warn("the E2B API is off: this state store keeps no E2B sandboxes")
		return nil
	}
	// The same key the endpoint proxy derives envd tokens from.
	key, err := LoadTokenKey(o)
	if err != nil {
		return fmt.Errorf("e2b api: %w", err)
	}
	domain := o.Domain
	if endpointPort != "" && endpointPort != "443" {
		domain += ":" + endpointPort
	}
	uploads, artifactDir, err := clusterUploads(o, st)
	if err != nil {
		return err
	}
	cfg := e2b.Config{API: srv, Uploads: uploads, ArtifactDir: artifactDir, Store: st, Sandboxes: es, Tokens: e2b.NewEnvdTokens(key), TrafficTokens: e2b.NewTrafficTokens(key), Domain: domain,
		TemplatesDir: e2bTemplatesDir(o), Operators: operators, MaxAccountUploadBytes: o.TemplateFilesMaxAccountBytes, References: o.References,
		Egress: fmt.Sprintf("arn:aws:lambda:%s:aws:network-connector:%s", o.Region, api.InternetEgressConnector),
		Ingress: []string{fmt.Sprintf("arn:aws:lambda:%s:aws:network-connector:%s", o.Region, api.AllIngressConnector),
			fmt.Sprintf("arn:aws:lambda:%s:aws:network-connector:%s", o.Region, api.ShellIngressConnector)}}
	if o.GCInterval > 0 {
		cfg.FilesMaxAge = cmp.Or(o.TemplateFilesMaxAge, gc.DefaultTemplateFilesMaxAge)
	}
	if uploads != nil {
		// Cluster control: the SDK's upload of a template's files and the
		// build naming them may reach different replicas.
		tf, ok := st.(store.TemplateFiles)
		if !ok {
			return fmt.Errorf("e2b api: cluster control needs a store that keeps template files (PostgreSQL); %T does not", st)
		}
		cfg.TemplateFiles = tf
	}
	if m, ok := be.(e2b.Meter); ok {
		cfg.Meter = m
	}
	if n, ok := be.(e2b.Policer); ok {
		cfg.Network = n
	}
	e2bSrv := e2b.New(cfg)
	// An older kiln's tags, builds and snapshot records (files of this
	// data dir) move into the store before the API serves.
	if _, err := e2bSrv.ImportFiles(ctx); err != nil {
		return fmt.Errorf("e2b api: moving the records of %s into the store: %w (the files not moved are tried again at the next start)", cfg.TemplatesDir, err)
	}
	h := e2bSrv.Handler()
	for _, p := range e2b.Prefixes {
		mux.Handle(p, h)
	}
	return nil
}
