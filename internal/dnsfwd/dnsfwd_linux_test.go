//go:build linux

package dnsfwd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/miekg/dns"

	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/netns/netnstest"
	"github.com/kiln-sandbox/kiln/internal/testenv"
)

// TestInNamespace serves at 172.30.0.1:53 inside a real VM namespace and
// forwards to an upstream on the host's loopback, which is only reachable
// if the upstream socket lives in the host namespace. A stand-in guest
// behind the TAP is answered; a query from any other address is not.
func TestInNamespace(t *testing.T) {
	testenv.NeedRoot(t, "namespaces, mounts or other users")
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
	g := netnstest.StartGuest(t, n)
	for _, netw := range []string{"udp", "tcp"} {
		t.Run(netw, func(t *testing.T) {
			ask := func(nsPath string) (*dns.Msg, error) {
				var conn *dns.Conn
				c := &dns.Client{Net: netw, Timeout: 2 * time.Second}
				if err := netns.RunInNS(nsPath, func() (err error) {
					conn, err = c.Dial("172.30.0.1:53")
					return err
				}); err != nil {
					return nil, err
				}
				defer conn.Close()
				m := new(dns.Msg)
				m.SetQuestion("vm.test.", dns.TypeA)
				r, _, err := c.ExchangeWithConn(m, conn)
				return r, err
			}
			// From the guest (172.30.0.2, through the TAP): answered.
			if r, err := ask(g.NSPath); err != nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				t.Fatalf("answer %v, %v", r, err)
			}
			// From the VM namespace itself (source 172.30.0.1): the packet
			// reaches the forwarder, which drops it unanswered.
			before := f.Refused.Load()
			if r, err := ask(n.NSPath); err == nil {
				t.Fatalf("answered a query not from the guest: %v", r)
			}
			if f.Refused.Load() != before+1 {
				t.Fatalf("refused = %d, want %d", f.Refused.Load(), before+1)
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
