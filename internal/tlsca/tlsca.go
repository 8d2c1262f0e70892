// Package tlsca provides the endpoint proxy's TLS certificate: either one
// the operator gives (CertFile/KeyFile, reloaded when the files change), or
// a wildcard certificate for *.DOMAIN and DOMAIN issued by kiln's own CA.
//
// The CA is ECDSA P-256, made on first start under DIR (DATA_DIR/tls) and
// exported to CAExport (DATA_DIR/ca.pem) for clients to trust. It carries a
// name constraint for DOMAIN, so a user who trusts ca.pem trusts it for
// kiln's endpoints only, never for other sites, even if its key leaks.
// The leaf lives 90 days and is renewed 30 days before expiry by Run.
package tlsca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Defaults for the self-issued chain.
const (
	CAValidity    = 10 * 365 * 24 * time.Hour
	LeafValidity  = 90 * 24 * time.Hour
	RenewBefore   = 30 * 24 * time.Hour
	CheckInterval = time.Hour
	DefaultDomain = "microvm.localhost"
	caCertFile    = "ca.pem"
	caKeyFile     = "ca.key"
	leafCertFile  = "leaf.pem"
	leafKeyFile   = "leaf.key"
)

// ErrInvalid reports a bad config or unusable files.
var ErrInvalid = errors.New("invalid tls config")

// Config says where the certificate comes from.
type Config struct {
	// Domain: endpoints are https://ID.Domain. Default microvm.localhost.
	Domain string
	// Dir holds the CA and leaf (DATA_DIR/tls); created 0700.
	Dir string
	// CAExport is where the CA certificate is copied for clients
	// (DATA_DIR/ca.pem). Empty: not exported.
	CAExport string
	// CertFile/KeyFile: an operator's certificate (PEM chain) and key. When
	// set, no CA is made and the files are re-read when they change.
	CertFile, KeyFile string
	// Now is for tests; default time.Now.
	Now func() time.Time
}

// Manager serves the current certificate and renews it.
type Manager struct {
	cfg  Config
	mu   sync.RWMutex
	cert *tls.Certificate
	// operator files' modification times, to reload on change
	certMod, keyMod time.Time
	caCert          *x509.Certificate
	caKey           *ecdsa.PrivateKey
}

// Open loads or creates the certificate material.
func Open(cfg Config) (*Manager, error) {
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	cfg.Domain = strings.ToLower(strings.TrimSuffix(cfg.Domain, "."))
	if strings.ContainsAny(cfg.Domain, "*/ :") || !strings.Contains(cfg.Domain, ".") {
		return nil, fmt.Errorf("domain %q: %w", cfg.Domain, ErrInvalid)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	m := &Manager{cfg: cfg}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, fmt.Errorf("give both cert and key files: %w", ErrInvalid)
	}
	if cfg.CertFile != "" {
		if err := m.loadOperator(); err != nil {
			return nil, err
		}
		return m, nil
	}
	if cfg.Dir == "" {
		return nil, fmt.Errorf("no tls dir: %w", ErrInvalid)
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", cfg.Dir, err)
	}
	if err := m.loadOrCreateCA(); err != nil {
		return nil, err
	}
	if err := m.loadOrIssueLeaf(); err != nil {
		return nil, err
	}
	return m, nil
}

// Domain returns the endpoint domain.
func (m *Manager) Domain() string { return m.cfg.Domain }

// GetCertificate is for tls.Config.GetCertificate.
func (m *Manager) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.cert, nil
}

// Leaf returns the current leaf certificate.
func (m *Manager) Leaf() *x509.Certificate {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.cert.Leaf
}

// CAPEM returns the CA certificate in PEM (nil with an operator cert).
func (m *Manager) CAPEM() []byte {
	if m.caCert == nil {
		return nil
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: m.caCert.Raw})
}

// TLSConfig returns a server config offering h2 and http/1.1.
func (m *Manager) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: m.GetCertificate,
		NextProtos:     []string{"h2", "http/1.1"},
	}
}

// Run checks hourly until ctx ends: renews the self-issued leaf when less
// than RenewBefore remains, or reloads changed operator files.
func (m *Manager) Run(ctx context.Context) {
	t := time.NewTicker(CheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := m.Check(); err != nil {
				slog.Error("tlsca: certificate check", "err", err)
			}
		}
	}
}

// Check performs one renewal/reload check.
func (m *Manager) Check() error {
	if m.cfg.CertFile != "" {
		return m.loadOperator()
	}
	m.mu.RLock()
	leaf := m.cert.Leaf
	m.mu.RUnlock()
	if m.cfg.Now().Add(RenewBefore).Before(leaf.NotAfter) {
		return nil
	}
	slog.Info("tlsca: renewing endpoint certificate", "domain", m.cfg.Domain, "not_after", leaf.NotAfter)
	return m.issueLeaf()
}

func (m *Manager) loadOperator() error {
	cs, err := os.Stat(m.cfg.CertFile)
	if err != nil {
		return fmt.Errorf("tls cert: %w", err)
	}
	ks, err := os.Stat(m.cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("tls key: %w", err)
	}
	if m.cert != nil && cs.ModTime().Equal(m.certMod) && ks.ModTime().Equal(m.keyMod) {
		return nil
	}
	c, err := tls.LoadX509KeyPair(m.cfg.CertFile, m.cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("loading operator certificate: %w", err)
	}
	if c.Leaf == nil {
		if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return fmt.Errorf("parsing operator certificate: %w", err)
		}
	}
	if err := c.Leaf.VerifyHostname("x." + m.cfg.Domain); err != nil {
		slog.Warn("tlsca: operator certificate does not cover *."+m.cfg.Domain, "err", err)
	}
	m.mu.Lock()
	m.cert, m.certMod, m.keyMod = &c, cs.ModTime(), ks.ModTime()
	m.mu.Unlock()
	return nil
}

func (m *Manager) path(name string) string { return filepath.Join(m.cfg.Dir, name) }

func (m *Manager) loadOrCreateCA() error {
	certPEM, err1 := os.ReadFile(m.path(caCertFile))
	keyPEM, err2 := os.ReadFile(m.path(caKeyFile))
	if err1 == nil && err2 == nil {
		cert, key, err := ParsePair(certPEM, keyPEM)
		if err != nil {
			return fmt.Errorf("loading ca: %w", err)
		}
		// A CA made for another domain (the operator changed DOMAIN) or about
		// to expire cannot sign our leaf: make a new one.
		// A CA without the loopback constraint (made before the leaf named
		// 127.0.0.1) could sign for any address: it is replaced too.
		if slicesContains(cert.PermittedDNSDomains, m.cfg.Domain) && loopbackOnly(cert.PermittedIPRanges) &&
			m.cfg.Now().Add(LeafValidity).Before(cert.NotAfter) {
			m.caCert, m.caKey = cert, key
			return m.exportCA()
		}
		slog.Warn("tlsca: existing CA does not fit domain or expires soon; making a new one", "domain", m.cfg.Domain)
	} else if !errors.Is(err1, os.ErrNotExist) && err1 != nil {
		return fmt.Errorf("reading ca: %w", err1)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	host, _ := os.Hostname()
	now := m.cfg.Now()
	tpl := &x509.Certificate{
		SerialNumber:                Serial(),
		Subject:                     pkix.Name{Organization: []string{"kiln"}, CommonName: "kiln endpoint CA " + host},
		NotBefore:                   now.Add(-time.Hour),
		NotAfter:                    now.Add(CAValidity),
		IsCA:                        true,
		BasicConstraintsValid:       true,
		MaxPathLenZero:              true,
		KeyUsage:                    x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		PermittedDNSDomainsCritical: true,
		PermittedDNSDomains:         []string{m.cfg.Domain},
		// The leaf also names the loopback addresses (E2B_SANDBOX_URL);
		// the CA may sign for those addresses and no other.
		PermittedIPRanges: loopbackRanges(),
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("creating ca: %w", err)
	}
	cert, _ := x509.ParseCertificate(der)
	if err := WritePair(m.path(caCertFile), m.path(caKeyFile), der, key); err != nil {
		return err
	}
	m.caCert, m.caKey = cert, key
	// The old leaf was signed by the old CA.
	os.Remove(m.path(leafCertFile))
	slog.Info("tlsca: created endpoint CA", "domain", m.cfg.Domain, "export", m.cfg.CAExport)
	return m.exportCA()
}

func (m *Manager) exportCA() error {
	if m.cfg.CAExport == "" {
		return nil
	}
	want := m.CAPEM()
	if cur, err := os.ReadFile(m.cfg.CAExport); err == nil && bytes.Equal(cur, want) {
		return nil
	}
	return writeAtomic(m.cfg.CAExport, want, 0o644)
}

func (m *Manager) loadOrIssueLeaf() error {
	certPEM, err1 := os.ReadFile(m.path(leafCertFile))
	keyPEM, err2 := os.ReadFile(m.path(leafKeyFile))
	if err1 == nil && err2 == nil {
		if c, err := tls.X509KeyPair(certPEM, keyPEM); err == nil {
			leaf, err := x509.ParseCertificate(c.Certificate[0])
			pool := x509.NewCertPool()
			pool.AddCert(m.caCert)
			if err == nil && leaf.VerifyHostname("x."+m.cfg.Domain) == nil && leaf.VerifyHostname(m.cfg.Domain) == nil &&
				leaf.VerifyHostname("127.0.0.1") == nil &&
				m.cfg.Now().Add(RenewBefore).Before(leaf.NotAfter) {
				if _, verr := leaf.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: m.cfg.Now()}); verr == nil {
					c.Leaf = leaf
					m.mu.Lock()
					m.cert = &c
					m.mu.Unlock()
					return nil
				}
			}
		}
	}
	return m.issueLeaf()
}

func (m *Manager) issueLeaf() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := m.cfg.Now()
	tpl := &x509.Certificate{
		SerialNumber: Serial(),
		Subject:      pkix.Name{Organization: []string{"kiln"}, CommonName: "*." + m.cfg.Domain},
		DNSNames:     []string{"*." + m.cfg.Domain, m.cfg.Domain},
		// Loopback too: E2B's SDK reaches every sandbox at one URL
		// (E2B_SANDBOX_URL=https://127.0.0.1:PORT) and routes by header,
		// since *.localhost names do not resolve through every C library.
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(LeafValidity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, m.caCert, &key.PublicKey, m.caKey)
	if err != nil {
		return fmt.Errorf("issuing leaf: %w", err)
	}
	if err := WritePair(m.path(leafCertFile), m.path(leafKeyFile), der, key); err != nil {
		return err
	}
	leaf, _ := x509.ParseCertificate(der)
	c := &tls.Certificate{Certificate: [][]byte{der, m.caCert.Raw}, PrivateKey: key, Leaf: leaf}
	m.mu.Lock()
	m.cert = c
	m.mu.Unlock()
	return nil
}

// ParsePair decodes a PEM certificate and its PEM EC private key.
func ParsePair(certPEM, keyPEM []byte) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, fmt.Errorf("no pem block: %w", ErrInvalid)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, err
	}
	return cert, key, nil
}

// WritePair writes a DER certificate and its key as PEM files, each
// atomically; the key is readable by its owner only.
func WritePair(certPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	kd, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeAtomic(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kd}), 0o600); err != nil {
		return err
	}
	return writeAtomic(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// writeAtomic writes via a temp file and rename, so a crash never leaves a
// half-written key or certificate.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// Serial is a random certificate serial number.
func Serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func slicesContains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// loopbackRanges are the only addresses the CA may sign for.
func loopbackRanges() []*net.IPNet {
	return []*net.IPNet{
		{IP: net.IPv4(127, 0, 0, 1).To4(), Mask: net.CIDRMask(32, 32)},
		{IP: net.IPv6loopback, Mask: net.CIDRMask(128, 128)},
	}
}

// loopbackOnly reports whether a CA's permitted IP ranges are exactly
// loopbackRanges.
func loopbackOnly(got []*net.IPNet) bool {
	want := loopbackRanges()
	if len(got) != len(want) {
		return false
	}
	for i := range want {
		if !got[i].IP.Equal(want[i].IP) || got[i].Mask.String() != want[i].Mask.String() {
			return false
		}
	}
	return true
}
