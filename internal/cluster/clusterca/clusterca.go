// Package clusterca is the certificate authority of a kiln cluster: the
// roles (control, node, edge) talk to each other over mutual TLS with
// certificates it signs, and each side checks the other's role, so that a
// node's key cannot be used to command another node as control.
//
// A certificate names its role and holder in one URI SAN,
// kiln-cluster://ROLE/NAME; host names and addresses the holder serves on
// are ordinary SANs. The CA's key stays with the operator (`kiln cluster-ca
// init` / `issue`); a running role holds only ca.crt and its own pair.
package clusterca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/tlsca"
)

// Role is what a certificate's holder may do in the cluster.
type Role string

const (
	Control Role = "control"
	Node    Role = "node"
	Edge    Role = "edge"
)

// Validity of what Init and Issue make.
const (
	CAValidity   = 10 * 365 * 24 * time.Hour
	LeafValidity = 365 * 24 * time.Hour
)

// File names in a CA directory and in an issued pair's directory (the
// key names of a Kubernetes TLS Secret with its ca.crt).
const (
	CACert   = "ca.crt"
	CAKey    = "ca.key"
	LeafCert = "tls.crt"
	LeafKey  = "tls.key"
)

const uriScheme = "kiln-cluster"

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$`)

// CA signs the cluster's certificates.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// Init loads the CA kept in dir (CACert, CAKey), or creates one there.
func Init(dir string) (*CA, error) {
	certPEM, err1 := os.ReadFile(filepath.Join(dir, CACert))
	keyPEM, err2 := os.ReadFile(filepath.Join(dir, CAKey))
	if err1 == nil && err2 == nil {
		cert, key, err := tlsca.ParsePair(certPEM, keyPEM)
		if err != nil {
			return nil, fmt.Errorf("loading the cluster CA from %s: %w", dir, err)
		}
		return &CA{cert: cert, key: key}, nil
	}
	if err1 != nil && !errors.Is(err1, os.ErrNotExist) {
		return nil, fmt.Errorf("reading the cluster CA: %w", err1)
	}
	if err1 == nil || !errors.Is(err2, os.ErrNotExist) {
		return nil, fmt.Errorf("%s holds only half of the cluster CA (%s and %s must both exist or both be absent): %w",
			dir, CACert, CAKey, errdefs.ErrInvalid)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tpl := &x509.Certificate{
		SerialNumber:          tlsca.Serial(),
		Subject:               pkix.Name{Organization: []string{"kiln"}, CommonName: "kiln cluster CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("creating the cluster CA: %w", err)
	}
	if err := tlsca.WritePair(filepath.Join(dir, CACert), filepath.Join(dir, CAKey), der, key); err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{cert: cert, key: key}, nil
}

// CertPEM is the CA certificate, which every role trusts.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

// Issue signs a certificate for name in role, valid for the host names
// and addresses in hosts (where it serves; a pure client needs none), and
// writes it into dir as LeafCert and LeafKey with a copy of CACert.
func (ca *CA) Issue(dir string, role Role, name string, hosts []string) error {
	if !validRole(role) {
		return fmt.Errorf("role %q: want control, node or edge: %w", role, errdefs.ErrInvalid)
	}
	if !nameRE.MatchString(name) {
		return fmt.Errorf("name %q: want lower-case letters, digits, dots and dashes (at most 63): %w", name, errdefs.ErrInvalid)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tpl := &x509.Certificate{
		SerialNumber: tlsca.Serial(),
		Subject:      pkix.Name{Organization: []string{"kiln"}, OrganizationalUnit: []string{string(role)}, CommonName: name},
		URIs:         []*url.URL{{Scheme: uriScheme, Host: string(role), Path: "/" + name}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(LeafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tpl.IPAddresses = append(tpl.IPAddresses, ip)
		} else if h != "" {
			tpl.DNSNames = append(tpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return fmt.Errorf("issuing the %s certificate of %s: %w", role, name, err)
	}
	if err := tlsca.WritePair(filepath.Join(dir, LeafCert), filepath.Join(dir, LeafKey), der, key); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, CACert), ca.CertPEM(), 0o644)
}

func validRole(r Role) bool { return r == Control || r == Node || r == Edge }

// Identity is a role's own certificate with the CA it trusts.
type Identity struct {
	Role Role
	Name string
	cert tls.Certificate
	pool *x509.CertPool
}

// Load reads an identity from PEM files: the CA certificate, the holder's
// certificate and key. The certificate must be signed by that CA and name
// a role.
func Load(caFile, certFile, keyFile string) (*Identity, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("reading the cluster CA certificate: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("reading the cluster certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s holds no PEM certificate: %w", caFile, errdefs.ErrInvalid)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, err
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("%s is not signed by the cluster CA in %s: %w", certFile, caFile, err)
	}
	role, name, err := RoleOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	pair.Leaf = leaf
	return &Identity{Role: role, Name: name, cert: pair, pool: pool}, nil
}

// LoadDir is Load on a directory written by CA.Issue (or a mounted
// Kubernetes TLS Secret with ca.crt).
func LoadDir(dir string) (*Identity, error) {
	return Load(filepath.Join(dir, CACert), filepath.Join(dir, LeafCert), filepath.Join(dir, LeafKey))
}

// RoleOf reads the role and name a cluster certificate was issued for.
func RoleOf(c *x509.Certificate) (Role, string, error) {
	for _, u := range c.URIs {
		if u.Scheme != uriScheme {
			continue
		}
		role, name := Role(u.Host), u.Path
		if len(name) > 1 && name[0] == '/' && validRole(role) && nameRE.MatchString(name[1:]) {
			return role, name[1:], nil
		}
	}
	return "", "", fmt.Errorf("certificate %q names no kiln cluster role (issue it with `kiln cluster-ca issue`): %w",
		c.Subject.CommonName, errdefs.ErrInvalid)
}

// verifyPeer accepts a verified peer chain only if its leaf names one of
// roles.
func verifyPeer(roles []Role) func([][]byte, [][]*x509.Certificate) error {
	return func(_ [][]byte, chains [][]*x509.Certificate) error {
		if len(chains) == 0 || len(chains[0]) == 0 {
			return errors.New("cluster peer sent no verified certificate")
		}
		role, name, err := RoleOf(chains[0][0])
		if err != nil {
			return err
		}
		if !slices.Contains(roles, role) {
			return fmt.Errorf("cluster peer %s has role %s, which may not call this service (allowed: %v)", name, role, roles)
		}
		return nil
	}
}

// ServerTLS is the configuration of a service that only the given roles
// may call.
func (id *Identity) ServerTLS(callers ...Role) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{id.cert},
		ClientAuth:            tls.RequireAndVerifyClientCert,
		ClientCAs:             id.pool,
		VerifyPeerCertificate: verifyPeer(callers),
	}
}

// ClientTLS is the configuration for calling a service run by the given
// role; the server's certificate must also cover the address dialled.
func (id *Identity) ClientTLS(server Role) *tls.Config {
	return &tls.Config{
		MinVersion:            tls.VersionTLS13,
		Certificates:          []tls.Certificate{id.cert},
		RootCAs:               id.pool,
		VerifyPeerCertificate: verifyPeer([]Role{server}),
	}
}

// PeerName returns the role and name of a TLS peer verified by ServerTLS.
func PeerName(st tls.ConnectionState) (Role, string, error) {
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return "", "", errors.New("no verified cluster peer")
	}
	return RoleOf(st.VerifiedChains[0][0])
}
