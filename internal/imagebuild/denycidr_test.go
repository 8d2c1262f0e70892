//go:build linux

package imagebuild

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	vnetns "github.com/vishvananda/netns"

	"github.com/kiln-sandbox/kiln/internal/image"
	"github.com/kiln-sandbox/kiln/internal/netns"
	"github.com/kiln-sandbox/kiln/internal/testenv"
	"github.com/kiln-sandbox/kiln/internal/vmm"
)

// egressProbe is a vmm.Driver (our own interface) whose Boot looks at the
// build VM's real network namespace instead of starting QEMU: it records
// whether the namespace's egress chain denies want, then fails the boot.
type egressProbe struct {
	vmm.Driver
	want   netip.Prefix
	found  bool
	booted bool
}

var errProbe = errors.New("probe: no vm booted")

func (p *egressProbe) Boot(ctx context.Context, spec vmm.BootSpec) (vmm.Info, error) {
	p.booted = true
	ns, err := vnetns.GetFromPath(spec.Net.Netns)
	if err != nil {
		return vmm.Info{}, err
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return vmm.Info{}, err
	}
	rules, err := c.GetRules(&nftables.Table{Family: nftables.TableFamilyINet, Name: netns.TableName}, &nftables.Chain{Name: "egress"})
	if err != nil {
		return vmm.Info{}, err
	}
	a := p.want.Masked().Addr().As4()
	for _, r := range rules {
		for _, e := range r.Exprs {
			if cmp, ok := e.(*expr.Cmp); ok && bytes.Equal(cmp.Data, a[:]) {
				p.found = true
			}
		}
	}
	return vmm.Info{}, errProbe
}

func (p *egressProbe) Terminate(ctx context.Context, id string) error { return nil }

// TestRunnerExtraDeny: the operator's --deny-cidr reaches the egress rules
// of a RUN step's build VM, not only those of app VMs.
func TestRunnerExtraDeny(t *testing.T) {
	testenv.NeedRoot(t, "network namespaces")
	disk := filepath.Join(t.TempDir(), "root.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", disk, "16M").CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4: %v: %s", err, out)
	}
	deny := netip.MustParsePrefix("192.88.99.0/28")
	p := &egressProbe{want: deny}
	r := &Runner{Driver: p, ExtraDeny: []netip.Prefix{deny, netip.MustParsePrefix("2001:4860::/32")}, Logger: testLogger()}
	_, err := r.Run(context.Background(), disk, image.RunStep{Args: []string{"/bin/true"}}, io.Discard)
	if !errors.Is(err, errProbe) {
		t.Fatalf("run: %v", err)
	}
	if !p.booted || !p.found {
		t.Fatalf("booted %v; egress chain denies %s: %v", p.booted, deny, p.found)
	}
}
