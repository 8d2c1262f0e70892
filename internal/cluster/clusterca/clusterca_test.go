package clusterca

import (
	"crypto/tls"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

func issue(t *testing.T, ca *CA, role Role, name string, hosts ...string) *Identity {
	t.Helper()
	dir := t.TempDir()
	if err := ca.Issue(dir, role, name, hosts); err != nil {
		t.Fatal(err)
	}
	id, err := LoadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if id.Role != role || id.Name != name {
		t.Fatalf("loaded %s/%s, want %s/%s", id.Role, id.Name, role, name)
	}
	return id
}

// handshake runs one TLS handshake between a server that admits callers
// and a client, and returns the client's error and the server's.
func handshake(t *testing.T, server *tls.Config, client *tls.Config) (error, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	srvErr := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srvErr <- err
			return
		}
		defer c.Close()
		tc := tls.Server(c, server)
		err = tc.Handshake()
		if err == nil {
			// TLS 1.3 checks the client certificate after the client's
			// handshake returns: read so that its verdict reaches the client.
			_, err = tc.Write([]byte("ok"))
		}
		srvErr <- err
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), client)
	if err == nil {
		_, err = io.ReadAll(c)
		if err != nil && strings.Contains(err.Error(), "EOF") {
			err = nil
		}
		c.Close()
	}
	return err, <-srvErr
}

func TestRolesAreChecked(t *testing.T) {
	ca, err := Init(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	control := issue(t, ca, Control, "control-0")
	node := issue(t, ca, Node, "node-a", "127.0.0.1")
	other := issue(t, ca, Node, "node-b", "127.0.0.1")

	// control calls a node: both sides accept.
	if cerr, serr := handshake(t, node.ServerTLS(Control, Edge), control.ClientTLS(Node)); cerr != nil || serr != nil {
		t.Fatalf("control to node: client %v, server %v", cerr, serr)
	}
	// another node presents a valid certificate of the wrong role.
	if _, serr := handshake(t, node.ServerTLS(Control, Edge), other.ClientTLS(Node)); serr == nil || !strings.Contains(serr.Error(), "role node") {
		t.Fatalf("node calling node as control: server error %v", serr)
	}
	// a client that expects control but reaches a node refuses it.
	if cerr, _ := handshake(t, node.ServerTLS(Control), control.ClientTLS(Control)); cerr == nil {
		t.Fatal("client accepted a node where it expected control")
	}
	// a certificate of another cluster's CA is refused.
	ca2, err := Init(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	stranger := issue(t, ca2, Control, "control-0")
	if _, serr := handshake(t, node.ServerTLS(Control), stranger.ClientTLS(Node)); serr == nil {
		t.Fatal("node accepted control of another CA")
	}
}

func TestInitKeepsTheCA(t *testing.T) {
	dir := t.TempDir()
	a, err := Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Init(dir)
	if err != nil {
		t.Fatal(err)
	}
	if string(a.CertPEM()) != string(b.CertPEM()) {
		t.Fatal("Init made a new CA over an existing one")
	}
	if _, err := Load(filepath.Join(dir, CACert), filepath.Join(dir, CACert), filepath.Join(dir, CAKey)); err == nil {
		t.Fatal("the CA's own certificate loaded as a role identity")
	}
	if err := a.Issue(t.TempDir(), "admin", "x", nil); err == nil {
		t.Fatal("issued an unknown role")
	}
	if err := a.Issue(t.TempDir(), Node, "../x", nil); err == nil {
		t.Fatal("issued a name with a path in it")
	}
}
