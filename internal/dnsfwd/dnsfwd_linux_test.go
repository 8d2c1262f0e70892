//go:build linux

package dnsfwd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"

	"github.com/kiln-sandbox/kiln/internal/netns"
)

// TestInNamespace serves at 172.30.0.1:53 inside a real VM namespace and
// forwards to an upstream on the host's loopback, which is only reachable
// if the upstream socket lives in the host namespace.
func TestInNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	up := upstream(t)
	hadHostTable := hostTableExists(t)
	t.Cleanup(func() {
		if !hadHostTable {
			netns.RemoveHostRules()
		}
	})
	b := make([]byte, 3)
	rand.Read(b)
	id := "tdns" + hex.EncodeToString(b)
	n, err := netns.Setup(context.Background(), netns.Config{ID: id, Egress: true})
	t.Cleanup(func() { netns.Teardown(context.Background(), id) })
	if err != nil {
		t.Fatal(err)
	}
	f, err := Start(context.Background(), Config{ID: id, NSPath: n.NSPath, Upstreams: []string{up}})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, netw := range []string{"udp", "tcp"} {
		t.Run(netw, func(t *testing.T) {
			var conn *dns.Conn
			c := &dns.Client{Net: netw, Timeout: 3 * time.Second}
			// The client socket is made inside the VM namespace, like a guest's.
			if err := netns.RunInNS(n.NSPath, func() (err error) {
				conn, err = c.Dial("172.30.0.1:53")
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			m := new(dns.Msg)
			m.SetQuestion("vm.test.", dns.TypeA)
			r, _, err := c.ExchangeWithConn(m, conn)
			if err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("answer %v, %v", r, err)
			}
		})
	}
}

func hostTableExists(t *testing.T) bool {
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tabs, _ := c.ListTablesOfFamily(nftables.TableFamilyINet)
	for _, tb := range tabs {
		if tb.Name == netns.TableName {
			return true
		}
	}
	return false
}
