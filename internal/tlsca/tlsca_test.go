package tlsca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func rootsFrom(t *testing.T, path string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		t.Fatal("no cert in ca.pem")
	}
	return p
}

// handshake does a real TLS handshake over loopback with the client
// trusting only roots, as curl --cacert would.
func handshake(t *testing.T, m *Manager, roots *x509.CertPool, serverName string) error {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", m.TLSConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.(*tls.Conn).Handshake()
		io.Copy(io.Discard, c)
		c.Close()
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: roots, ServerName: serverName})
	if err != nil {
		return err
	}
	return c.Close()
}

func TestSelfIssued(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Domain: "microvm.localhost", Dir: filepath.Join(dir, "tls"), CAExport: filepath.Join(dir, "ca.pem")}
	m, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	roots := rootsFrom(t, cfg.CAExport)
	tests := []struct {
		name, host string
		ok         bool
	}{
		{"microvm endpoint", "abc123.microvm.localhost", true},
		{"bare domain", "microvm.localhost", true},
		{"two labels deep", "a.b.microvm.localhost", false},
		{"other domain", "example.com", false},
		// E2B_SANDBOX_URL=https://127.0.0.1:PORT routes by header.
		{"loopback address", "127.0.0.1", true},
		{"ipv6 loopback", "::1", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := handshake(t, m, roots, tc.host)
			if (err == nil) != tc.ok {
				t.Fatalf("handshake %s: %v, want ok=%v", tc.host, err, tc.ok)
			}
		})
	}

	// Restart: the same CA and leaf come back from disk.
	m2, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if m2.Leaf().SerialNumber.Cmp(m.Leaf().SerialNumber) != 0 {
		t.Fatal("leaf re-issued on restart")
	}
	if err := handshake(t, m2, roots, "x.microvm.localhost"); err != nil {
		t.Fatal(err)
	}
}

func TestNameConstraint(t *testing.T) {
	// Even with the CA key, a certificate for another site must not verify
	// for clients that trust ca.pem.
	dir := t.TempDir()
	m, err := Open(Config{Domain: "kiln.test", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tpl := &x509.Certificate{SerialNumber: Serial(), Subject: pkix.Name{CommonName: "bank.example"},
		DNSNames: []string{"bank.example"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tpl, m.caCert, &key.PublicKey, m.caKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	roots := x509.NewCertPool()
	roots.AddCert(m.caCert)
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: "bank.example"}); err == nil {
		t.Fatal("CA signed a verifiable certificate outside its domain")
	}
	// Nor for an address other than loopback: the leaf names 127.0.0.1,
	// so the CA carries IP constraints too.
	tpl = &x509.Certificate{SerialNumber: Serial(), Subject: pkix.Name{CommonName: "10.0.0.1"},
		IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err = x509.CreateCertificate(rand.Reader, tpl, m.caCert, &key.PublicKey, m.caKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ = x509.ParseCertificate(der)
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots}); err == nil {
		t.Fatal("CA signed a verifiable certificate for a non-loopback address")
	}
}

func TestRenewal(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	cfg := Config{Domain: "kiln.test", Dir: dir, CAExport: filepath.Join(dir, "ca.pem"), Now: func() time.Time { return now }}
	m, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	first := m.Leaf()
	tests := []struct {
		name    string
		advance time.Duration
		renewed bool
	}{
		{"fresh: kept", time.Hour, false},
		{"31 days left: kept", LeafValidity - RenewBefore - 24*time.Hour, false},
		{"29 days left: renewed", LeafValidity - RenewBefore + 24*time.Hour, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			now = first.NotBefore.Add(time.Hour + tc.advance)
			before := m.Leaf()
			if err := m.Check(); err != nil {
				t.Fatal(err)
			}
			if got := m.Leaf().SerialNumber.Cmp(before.SerialNumber) != 0; got != tc.renewed {
				t.Fatalf("renewed = %v, want %v", got, tc.renewed)
			}
		})
	}
	if !m.Leaf().NotAfter.After(first.NotAfter) {
		t.Fatal("renewed leaf does not outlive the first")
	}
}

func TestDomainChangeMakesNewCA(t *testing.T) {
	dir := t.TempDir()
	a, err := Open(Config{Domain: "one.test", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(Config{Domain: "two.test", Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if a.caCert.Equal(b.caCert) {
		t.Fatal("CA reused for another domain")
	}
	if err := b.Leaf().VerifyHostname("vm.two.test"); err != nil {
		t.Fatal(err)
	}
}

func TestOperatorCert(t *testing.T) {
	dir := t.TempDir()
	// Make an "operator" cert with a throwaway CA.
	src, err := Open(Config{Domain: "ops.test", Dir: filepath.Join(dir, "src"), CAExport: filepath.Join(dir, "ops-ca.pem")})
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath := filepath.Join(dir, "src", leafCertFile), filepath.Join(dir, "src", leafKeyFile)
	m, err := Open(Config{Domain: "ops.test", CertFile: certPath, KeyFile: keyPath})
	if err != nil {
		t.Fatal(err)
	}
	if m.CAPEM() != nil {
		t.Fatal("operator mode exported a CA")
	}
	if err := handshake(t, m, rootsFrom(t, filepath.Join(dir, "ops-ca.pem")), "vm1.ops.test"); err != nil {
		t.Fatal(err)
	}
	// Replace the files: Check picks up the new pair.
	now := time.Now().Add(LeafValidity)
	src.cfg.Now = func() time.Time { return now }
	if err := src.issueLeaf(); err != nil {
		t.Fatal(err)
	}
	future := time.Now().Add(time.Minute)
	os.Chtimes(certPath, future, future)
	if err := m.Check(); err != nil {
		t.Fatal(err)
	}
	if m.Leaf().SerialNumber.Cmp(src.Leaf().SerialNumber) != 0 {
		t.Fatal("operator cert not reloaded")
	}
	if _, err := Open(Config{Domain: "ops.test", CertFile: certPath}); err == nil {
		t.Fatal("cert without key accepted")
	}
}
