// Package kube follows a Kubernetes Node object from inside the cluster
// and mirrors its cordon (spec.unschedulable) into kiln's store, so that
// `kubectl cordon` and `kubectl drain` stop placement on the host as they
// stop the scheduler.
//
// It speaks the API server's REST protocol with net/http and
// encoding/json into k8s.io/api types: kiln needs one object, and
// client-go would bring a large dependency tree for it.
package kube

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ServiceAccountDir is where the kubelet mounts a Pod's API token and the
// cluster's CA.
const ServiceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// InCluster reports whether this process runs in a Kubernetes Pod (the
// kubelet sets KUBERNETES_SERVICE_HOST in every container).
func InCluster() bool { return os.Getenv("KUBERNETES_SERVICE_HOST") != "" }

// Client reads Node objects from the API server.
type Client struct {
	// Server is the API server's base URL (https://HOST:PORT).
	Server string
	// TokenFile holds the bearer token. It is read on every request: the
	// kubelet rotates projected service account tokens in place.
	TokenFile string
	HTTP      *http.Client
}

// NewInCluster returns a client for the API server this Pod's service
// account reaches: KUBERNETES_SERVICE_HOST/PORT, and the token and CA in
// dir (ServiceAccountDir in a Pod).
func NewInCluster(dir string) (*Client, error) {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, fmt.Errorf("kube: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: not running in a Kubernetes Pod")
	}
	ca, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("kube: the cluster CA: %w (does the Pod's service account mount its token? automountServiceAccountToken)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("kube: %s holds no PEM certificate", filepath.Join(dir, "ca.crt"))
	}
	return &Client{
		Server:    "https://" + net.JoinHostPort(host, port),
		TokenFile: filepath.Join(dir, "token"),
		HTTP: &http.Client{Transport: &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout: 10 * time.Second,
			Proxy:               nil, // the API server is never reached through a proxy
		}},
	}, nil
}

func (c *Client) get(ctx context.Context, path string, q url.Values) (*http.Response, error) {
	u := c.Server + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	if c.TokenFile != "" {
		tok, err := os.ReadFile(c.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("kube: reading the service account token: %w", err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kube: GET %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		return nil, statusError(path, resp)
	}
	return resp, nil
}

// StatusError is a non-200 answer of the API server.
type StatusError struct {
	Path    string
	Code    int
	Message string
}

func (e *StatusError) Error() string {
	hint := ""
	switch e.Code {
	case http.StatusUnauthorized, http.StatusForbidden:
		hint = " (the service account needs get and watch on nodes: deploy/kubernetes/base/rbac.yaml)"
	case http.StatusNotFound:
		hint = " (is --kube-node the Kubernetes Node's name? the DaemonSet passes spec.nodeName)"
	}
	return fmt.Sprintf("kube: GET %s: %d %s%s", e.Path, e.Code, e.Message, hint)
}

func statusError(path string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var st metav1.Status
	msg := http.StatusText(resp.StatusCode)
	if json.Unmarshal(b, &st) == nil && st.Message != "" {
		msg = st.Message
	}
	return &StatusError{Path: path, Code: resp.StatusCode, Message: msg}
}

// maxObject bounds one Node object or watch event: real ones are a few
// tens of KiB (images lists included).
const maxObject = 4 << 20

// GetNode reads the Node called name.
func (c *Client) GetNode(ctx context.Context, name string) (*corev1.Node, error) {
	path := "/api/v1/nodes/" + url.PathEscape(name)
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := c.get(ctx, path, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var n corev1.Node
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxObject)).Decode(&n); err != nil {
		return nil, fmt.Errorf("kube: GET %s: decoding the Node: %w", path, err)
	}
	return &n, nil
}

// ErrExpired is the API server's 410 Gone for a watch from a resource
// version it no longer has: start again from a fresh GET.
var ErrExpired = errors.New("kube: the watch's resource version expired")

// WatchNode streams the changes of the Node called name after
// resourceVersion to fn, until the server ends the watch (nil: watch
// again from the last version fn saw), ctx ends, or an error (fn's
// included).
func (c *Client) WatchNode(ctx context.Context, name, resourceVersion string, timeout time.Duration, fn func(*corev1.Node) error) error {
	q := url.Values{
		"watch":           {"true"},
		"fieldSelector":   {"metadata.name=" + name},
		"resourceVersion": {resourceVersion},
		"timeoutSeconds":  {fmt.Sprint(int(timeout.Seconds()))},
		// Bookmarks keep resourceVersion fresh on a quiet Node, so a
		// watch resumed later is not told 410 Gone.
		"allowWatchBookmarks": {"true"},
	}
	// The server ends the watch after timeout; a connection that died
	// without a word (a vanished peer) must not hold it for ever.
	ctx, cancel := context.WithTimeout(ctx, timeout+30*time.Second)
	defer cancel()
	resp, err := c.get(ctx, "/api/v1/nodes", q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return DecodeEvents(resp.Body, name, fn)
}

// event is one line of a watch stream (metav1.WatchEvent, with the object
// left raw until its type is known).
type event struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// DecodeEvents reads a watch stream of Node events and hands fn each
// ADDED or MODIFIED Node named name, and each BOOKMARK as a Node with
// only its resource version (and no name). It returns nil at the end of the stream,
// ErrExpired for a 410 ERROR event, fn's error, and an error for
// anything malformed.
func DecodeEvents(r io.Reader, name string, fn func(*corev1.Node) error) error {
	dec := json.NewDecoder(r)
	for {
		var ev event
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("kube: reading the watch of node %s: %w", name, err)
		}
		if dec.InputOffset() > maxObject*16 {
			// Bounded per connection; the caller watches again.
			return nil
		}
		if len(ev.Object) > maxObject {
			return fmt.Errorf("kube: watch event of %d bytes", len(ev.Object))
		}
		switch ev.Type {
		case "ADDED", "MODIFIED", "BOOKMARK":
			var n corev1.Node
			if err := json.Unmarshal(ev.Object, &n); err != nil {
				return fmt.Errorf("kube: watch of node %s: a %s event: %w", name, ev.Type, err)
			}
			if ev.Type == "BOOKMARK" {
				// Only its resource version means anything.
				n = corev1.Node{ObjectMeta: metav1.ObjectMeta{ResourceVersion: n.ResourceVersion}}
			} else if n.Name != name {
				return fmt.Errorf("kube: watch of node %s: an event for node %q", name, n.Name)
			}
			if err := fn(&n); err != nil {
				return err
			}
		case "DELETED":
			// The Node is gone (the host left the cluster): the store's
			// cordon stays as it was; the node's lease decides the rest.
		case "ERROR":
			var st metav1.Status
			if err := json.Unmarshal(ev.Object, &st); err != nil {
				return fmt.Errorf("kube: watch of node %s: an ERROR event: %w", name, err)
			}
			if st.Code == http.StatusGone {
				return ErrExpired
			}
			return fmt.Errorf("kube: watch of node %s: %d %s", name, st.Code, st.Message)
		default:
			return fmt.Errorf("kube: watch of node %s: unknown event type %q", name, ev.Type)
		}
	}
}
