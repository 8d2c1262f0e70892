// Package kubernetes_test checks kiln's Kubernetes manifests without a
// cluster: every file is decoded strictly into the Kubernetes API types
// (an unknown or misspelt field fails, as the API server's strict field
// validation would), every kustomization is rendered in-process with
// kustomize, and the rendered objects are held to the invariants kiln
// depends on (docs/CLUSTER.md).
package kubernetes_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/kustomize/api/krusty"
	ktypes "sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// kustomizations are the folders `kubectl apply -k` is meant for.
var kustomizations = []string{"base", "overlays/example"}

func decoder(t *testing.T) runtime.Decoder {
	t.Helper()
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme, rbacv1.AddToScheme} {
		if err := add(s); err != nil {
			t.Fatal(err)
		}
	}
	return serializer.NewCodecFactory(s, serializer.EnableStrict).UniversalDeserializer()
}

// splitDocs splits a YAML stream into its non-empty documents.
func splitDocs(t *testing.T, b []byte) [][]byte {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(b)))
	var docs [][]byte
	for {
		d, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(bytes.TrimSpace(stripComments(d))) > 0 {
			docs = append(docs, d)
		}
	}
}

func stripComments(b []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if t := bytes.TrimSpace(l); len(t) > 0 && t[0] != '#' {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

// TestManifestsDecodeStrictly: every YAML file under deploy/kubernetes is
// a kustomization (decoded strictly into kustomize's type) or a list of
// Kubernetes objects of known kinds with no unknown or duplicate field,
// and is used by some kustomization (no file lies around unapplied).
func TestManifestsDecodeStrictly(t *testing.T) {
	dec := decoder(t)
	used := map[string]bool{}
	var files []string
	err := filepath.WalkDir(".", func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !e.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no manifests found")
	}
	for _, p := range files {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if filepath.Base(p) == "kustomization.yaml" {
			var k ktypes.Kustomization
			if err := yaml.UnmarshalStrict(b, &k); err != nil {
				t.Errorf("%s: %v", p, err)
				continue
			}
			dir := filepath.Dir(p)
			for _, r := range k.Resources {
				used[filepath.Join(dir, r)] = true
			}
			for _, pt := range k.Patches {
				if pt.Path != "" {
					used[filepath.Join(dir, pt.Path)] = true
				}
			}
			continue
		}
		docs := splitDocs(t, b)
		if len(docs) == 0 {
			t.Errorf("%s: no objects", p)
		}
		for i, d := range docs {
			if _, gvk, err := dec.Decode(d, nil, nil); err != nil {
				t.Errorf("%s, document %d: %v", p, i+1, err)
			} else if gvk.Kind == "" {
				t.Errorf("%s, document %d: no kind", p, i+1)
			}
		}
	}
	for _, p := range files {
		if filepath.Base(p) != "kustomization.yaml" && !used[p] {
			t.Errorf("%s is not listed in any kustomization.yaml (resources or patches)", p)
		}
	}
}

// TestStrictDecodingCatchesTypos proves the decoding above is strict: a
// misspelt field, which a lenient decode would silently drop, fails.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	dec := decoder(t)
	for name, doc := range map[string]string{
		"unknown field":   "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\nautomountServiceAcountToken: false\n",
		"duplicate field": "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  name: y\n",
		"unknown kind":    "apiVersion: v1\nkind: Pood\nmetadata:\n  name: x\n",
	} {
		if _, _, err := dec.Decode([]byte(doc), nil, nil); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

// objects are a rendered kustomization's objects by kind.
type objects struct {
	deployments  []*appsv1.Deployment
	daemonSets   []*appsv1.DaemonSet
	services     []*corev1.Service
	pdbs         []*policyv1.PodDisruptionBudget
	accounts     []*corev1.ServiceAccount
	roles        []*rbacv1.ClusterRole
	nsRoles      []*rbacv1.Role
	bindings     []*rbacv1.ClusterRoleBinding
	nsBindings   []*rbacv1.RoleBinding
	configMaps   []*corev1.ConfigMap
	others       []runtime.Object
	namespace    string
	renderedYAML []byte
}

func render(t *testing.T, dir string) *objects {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	b, err := m.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	return decodeRendered(t, dir, b)
}

// decodeRendered decodes kustomize's output strictly, by kind.
func decodeRendered(t *testing.T, dir string, b []byte) *objects {
	t.Helper()
	o := &objects{renderedYAML: b}
	dec := decoder(t)
	for i, d := range splitDocs(t, b) {
		obj, _, err := dec.Decode(d, nil, nil)
		if err != nil {
			t.Fatalf("%s: rendered document %d: %v\n%s", dir, i+1, err, d)
		}
		switch x := obj.(type) {
		case *appsv1.Deployment:
			o.deployments = append(o.deployments, x)
		case *appsv1.DaemonSet:
			o.daemonSets = append(o.daemonSets, x)
		case *corev1.Service:
			o.services = append(o.services, x)
		case *policyv1.PodDisruptionBudget:
			o.pdbs = append(o.pdbs, x)
		case *corev1.ServiceAccount:
			o.accounts = append(o.accounts, x)
		case *rbacv1.ClusterRole:
			o.roles = append(o.roles, x)
		case *rbacv1.Role:
			o.nsRoles = append(o.nsRoles, x)
		case *rbacv1.ClusterRoleBinding:
			o.bindings = append(o.bindings, x)
		case *rbacv1.RoleBinding:
			o.nsBindings = append(o.nsBindings, x)
		case *corev1.ConfigMap:
			o.configMaps = append(o.configMaps, x)
		case *corev1.Namespace:
			o.namespace = x.Name
		default:
			o.others = append(o.others, obj)
		}
	}
	return o
}

// workload is a pod template with the name of what owns it.
type workload struct {
	name     string
	labels   map[string]string
	spec     *corev1.PodSpec
	replicas int32
}

func (o *objects) workloads() []workload {
	var w []workload
	for _, d := range o.deployments {
		r := int32(1)
		if d.Spec.Replicas != nil {
			r = *d.Spec.Replicas
		}
		w = append(w, workload{"Deployment/" + d.Name, d.Spec.Template.Labels, &d.Spec.Template.Spec, r})
	}
	for _, d := range o.daemonSets {
		w = append(w, workload{"DaemonSet/" + d.Name, d.Spec.Template.Labels, &d.Spec.Template.Spec, -1})
	}
	return w
}

// role returns the workload whose container runs `kiln ROLE`.
func (o *objects) role(name string) (workload, bool) {
	for _, w := range o.workloads() {
		for _, c := range w.spec.Containers {
			if len(c.Args) > 0 && c.Args[0] == name {
				return w, true
			}
		}
	}
	return workload{}, false
}

// hostCgroupMount is where the node Pod sees the host's cgroup file
// system: not over /sys/fs/cgroup, which is the Pod's own subtree when
// the runtime gives it a cgroup namespace (internal/jail, cgroupns.go).
const hostCgroupMount = "/host/sys/fs/cgroup"

// check holds a rendered kustomization to kiln's invariants and returns
// every violation.
func check(o *objects) []string {
	var bad []string
	fail := func(format string, a ...any) { bad = append(bad, fmt.Sprintf(format, a...)) }

	// kiln node: privileged, on KVM hosts, with the host's devices,
	// network namespaces, cgroups and data dir, and outside the Pod's
	// PID namespace, so that QEMU outlives the Pod.
	if len(o.daemonSets) != 1 {
		fail("want exactly one DaemonSet (kiln node), have %d", len(o.daemonSets))
	}
	if n, ok := o.role("node"); !ok {
		fail("no workload runs `kiln node`")
	} else {
		if !strings.HasPrefix(n.name, "DaemonSet/") {
			fail("%s runs kiln node: want a DaemonSet (one per host)", n.name)
		}
		s := n.spec
		if !onKVMHosts(s) {
			fail("%s: not restricted to hosts labelled kiln.dev/kvm=true (nodeSelector or required node affinity)", n.name)
		}
		if !s.HostNetwork {
			fail("%s: hostNetwork is off (TAP devices, nftables and the gRPC port live in the host's network)", n.name)
		}
		if !s.HostPID {
			fail("%s: hostPID is off: QEMU would die with the Pod's PID namespace", n.name)
		}
		c := s.Containers[0]
		if !slices.Contains(c.Args, "--cgroup-root="+hostCgroupMount) {
			fail("%s: kiln node lacks --cgroup-root=%s: it would make QEMU's cgroups in the Pod's own cgroup tree where the runtime gives it a cgroup namespace", n.name, hostCgroupMount)
		}
		if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
			fail("%s: container %s is not privileged", n.name, c.Name)
		}
		for _, want := range []struct {
			host, mount string
			typ         corev1.HostPathType
			prop        corev1.MountPropagationMode
		}{
			{"/dev/kvm", "/dev/kvm", corev1.HostPathCharDev, ""},
			{"/dev/net/tun", "/dev/net/tun", corev1.HostPathCharDev, ""},
			{"/run/netns", "/run/netns", "", corev1.MountPropagationBidirectional},
			{"/sys/fs/cgroup", hostCgroupMount, "", ""},
			{"/var/lib/kiln", "/var/lib/kiln", "", ""},
		} {
			v := hostPathVolume(s, want.host)
			if v == nil {
				fail("%s: no hostPath volume for %s", n.name, want.host)
				continue
			}
			if want.typ != "" && (v.HostPath.Type == nil || *v.HostPath.Type != want.typ) {
				fail("%s: hostPath %s: want type %s", n.name, want.host, want.typ)
			}
			m := mountOf(c, v.Name)
			switch {
			case m == nil:
				fail("%s: hostPath %s is not mounted in %s", n.name, want.host, c.Name)
			case m.MountPath != want.mount:
				fail("%s: hostPath %s mounted at %s, want %s", n.name, want.host, m.MountPath, want.mount)
			case m.ReadOnly:
				fail("%s: hostPath %s mounted read-only", n.name, want.host)
			case want.prop != "" && (m.MountPropagation == nil || *m.MountPropagation != want.prop):
				fail("%s: hostPath %s: want mount propagation %s", n.name, want.host, want.prop)
			}
		}
	}

	// kiln control: at least two replicas, kept by a disruption budget
	// that still lets a drain proceed.
	if c, ok := o.role("control"); !ok {
		fail("no workload runs `kiln control`")
	} else {
		if c.replicas < 2 {
			fail("%s: %d replicas, want at least 2", c.name, c.replicas)
		}
		checkPDB(o, c, fail)
	}

	// kiln edge: reachable on 443 from outside the cluster.
	if e, ok := o.role("edge"); !ok {
		fail("no workload runs `kiln edge`")
	} else {
		checkPDB(o, e, fail)
		exposed := false
		for _, s := range o.services {
			if !selects(s.Spec.Selector, e.labels) || (s.Spec.Type != corev1.ServiceTypeLoadBalancer && s.Spec.Type != corev1.ServiceTypeNodePort) {
				continue
			}
			for _, p := range s.Spec.Ports {
				if p.Port == 443 && containerPort(e.spec, p.TargetPort) {
					exposed = true
				}
			}
		}
		if !exposed {
			fail("%s: no LoadBalancer or NodePort Service exposes port 443 to one of its container ports", e.name)
		}
		// control writes its --endpoint-addr port into every endpoint URL
		// and E2B sandbox domain; anything but the edge's public 443 sends
		// clients (the SDKs, kiln exec) to a port nothing serves.
		if c, ok := o.role("control"); ok {
			if v := flagValue(c.spec.Containers[0], "endpoint-addr"); !strings.HasSuffix(v, ":443") {
				fail("%s: --endpoint-addr=%q: endpoint URLs would name a port other than the edge Service's 443", c.name, v)
			}
		}
	}

	// Every Service selects pods and targets a port they have.
	for _, s := range o.services {
		var w *workload
		for _, x := range o.workloads() {
			if selects(s.Spec.Selector, x.labels) {
				w = &x
			}
		}
		if w == nil {
			fail("Service %s selects no workload", s.Name)
			continue
		}
		for _, p := range s.Spec.Ports {
			if !containerPort(w.spec, p.TargetPort) {
				fail("Service %s: target port %s is not a port of %s", s.Name, p.TargetPort.String(), w.name)
			}
		}
	}

	// Every container: requests and limits, probes, a pinned image.
	accounts := map[string]*corev1.ServiceAccount{}
	for _, a := range o.accounts {
		accounts[a.Name] = a
	}
	for _, w := range o.workloads() {
		for _, c := range slices.Concat(w.spec.InitContainers, w.spec.Containers) {
			for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				if _, ok := c.Resources.Requests[r]; !ok {
					fail("%s/%s: no %s request", w.name, c.Name, r)
				}
				if _, ok := c.Resources.Limits[r]; !ok {
					fail("%s/%s: no %s limit", w.name, c.Name, r)
				}
			}
			if !pinned(c.Image) {
				fail("%s/%s: image %q has no version tag or digest (or is latest)", w.name, c.Name, c.Image)
			}
		}
		for _, c := range w.spec.Containers {
			if c.LivenessProbe == nil || c.ReadinessProbe == nil {
				fail("%s/%s: needs a liveness and a readiness probe", w.name, c.Name)
			}
			for _, p := range []*corev1.Probe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
				if p != nil && p.HTTPGet != nil && p.HTTPGet.Port.Type == intstr.String && !containerPort(w.spec, p.HTTPGet.Port) {
					fail("%s/%s: probe port %s is not a container port", w.name, c.Name, p.HTTPGet.Port.StrVal)
				}
			}
			// Only kiln node is privileged; the others run as non-root
			// with no capabilities.
			if len(c.Args) > 0 && c.Args[0] != "node" {
				sc := c.SecurityContext
				if sc == nil || (sc.Privileged != nil && *sc.Privileged) || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
					sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") {
					fail("%s/%s: must not be privileged: allowPrivilegeEscalation false, capabilities drop ALL", w.name, c.Name)
				}
				if ps := w.spec.SecurityContext; ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot {
					fail("%s: must run as non-root", w.name)
				}
				// Secret files belong to root: a non-root kiln reads them
				// through the pod's fsGroup (group read) or not at all.
				for _, v := range w.spec.Volumes {
					if v.Secret == nil {
						continue
					}
					mode := int32(0o644)
					if v.Secret.DefaultMode != nil {
						mode = *v.Secret.DefaultMode
					}
					ps := w.spec.SecurityContext
					if mode&0o004 == 0 && (mode&0o040 == 0 || ps == nil || ps.FSGroup == nil) {
						fail("%s: secret volume %s (mode %#o) is unreadable by its non-root user", w.name, v.Name, mode)
					}
				}
			}
		}
		// An API token only where the Kubernetes API is used (node's
		// cordon watcher).
		sa := w.spec.ServiceAccountName
		a, ok := accounts[sa]
		if sa == "" || !ok {
			fail("%s: service account %q is not defined here", w.name, sa)
			continue
		}
		mount := a.AutomountServiceAccountToken == nil || *a.AutomountServiceAccountToken
		if w.spec.AutomountServiceAccountToken != nil {
			mount = *w.spec.AutomountServiceAccountToken
		}
		n, _ := o.role("node")
		if mount && n.name != w.name {
			fail("%s: mounts an API token but never talks to the Kubernetes API", w.name)
		}
		if !mount && n.name == w.name {
			fail("%s: no API token: the cordon watcher cannot read its Node", w.name)
		}
	}

	// RBAC: node may get and watch Nodes (the cordon watcher), nothing
	// more; no one else is bound to anything.
	if len(o.nsRoles) > 0 || len(o.nsBindings) > 0 {
		fail("namespaced Roles or RoleBindings: kiln needs none")
	}
	node, _ := o.role("node")
	granted := map[string]bool{}
	for _, r := range o.roles {
		for _, rule := range r.Rules {
			if len(rule.NonResourceURLs) > 0 {
				fail("ClusterRole %s: non-resource URLs", r.Name)
			}
			for _, g := range rule.APIGroups {
				for _, res := range rule.Resources {
					for _, v := range rule.Verbs {
						granted[g+"/"+res+":"+v] = true
					}
				}
			}
		}
	}
	want := map[string]bool{"/nodes:get": true, "/nodes:watch": true}
	for g := range granted {
		if !want[g] {
			fail("RBAC grants %s, which kiln does not need", g)
		}
	}
	for g := range want {
		if !granted[g] {
			fail("RBAC does not grant %s: the cordon watcher needs it", g)
		}
	}
	for _, b := range o.bindings {
		for _, s := range b.Subjects {
			if node.spec == nil || s.Kind != rbacv1.ServiceAccountKind || s.Name != node.spec.ServiceAccountName || s.Namespace != o.namespace {
				fail("ClusterRoleBinding %s binds %s %s/%s; only node's service account may be bound", b.Name, s.Kind, s.Namespace, s.Name)
			}
		}
	}
	for _, x := range o.others {
		fail("unexpected object %T: add it to the checks", x)
	}
	checkCommandLines(o, fail)
	return bad
}

// checkCommandLines holds the roles' command lines to what the commands
// accept and need (cmd/kiln: cluster.go, edge.go, node_linux.go).
func checkCommandLines(o *objects, fail func(string, ...any)) {
	// Every role reads the store's URL from the Secret, never from its
	// arguments, and proves itself with its role's cluster certificate.
	for _, role := range []string{"control", "node", "edge"} {
		w, ok := o.role(role)
		if !ok {
			continue
		}
		c := w.spec.Containers[0]
		if e := envVar(c, "KILN_STORE"); e == nil || e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil || e.ValueFrom.SecretKeyRef.Name != "kiln-store" {
			fail("%s: KILN_STORE does not come from the Secret kiln-store", w.name)
		}
		if flagValue(c, "store") != "" {
			fail("%s: --store in the arguments shows the PostgreSQL password", w.name)
		}
		for _, f := range []string{"cluster-ca", "cluster-cert", "cluster-key"} {
			if name, _ := secretFile(w, c, flagValue(c, f)); name != "kiln-cluster-"+role {
				fail("%s: --%s is not a file of the Secret kiln-cluster-%s", w.name, f, role)
			}
		}
	}

	// control and edge share the endpoint token key; only control has
	// the sealing key (the edge and the nodes never unseal access keys).
	ctl, okC := o.role("control")
	edge, okE := o.role("edge")
	if okC && okE {
		cc, ec := ctl.spec.Containers[0], edge.spec.Containers[0]
		cs, ck := secretFile(ctl, cc, flagValue(cc, "token-key"))
		es, ek := secretFile(edge, ec, flagValue(ec, "token-key"))
		if cs == "" || ck != "token.key" {
			fail("%s: --token-key is not the key token.key of a mounted Secret (every replica must sign with the same key)", ctl.name)
		} else if es != cs || ek != ck {
			fail("%s: --token-key is not control's token key (Secret %s, key %s): the edge would refuse every endpoint token", edge.name, cs, ck)
		}
		if s, k := secretFile(ctl, cc, flagValue(cc, "sealing-key")); s == "" || k != "secrets.key" {
			fail("%s: --sealing-key is not the key secrets.key of a mounted Secret (every replica must unseal with the same key)", ctl.name)
		}
	}
	for _, w := range o.workloads() {
		if w.name == ctl.name {
			continue
		}
		for _, v := range w.spec.Volumes {
			if v.Secret == nil || v.Secret.SecretName != "kiln-keys" {
				continue
			}
			if len(v.Secret.Items) == 0 {
				fail("%s: mounts all of kiln-keys, the sealing key included; list only the keys it needs", w.name)
			}
			for _, it := range v.Secret.Items {
				if it.Key == "secrets.key" {
					fail("%s: mounts the sealing key secrets.key, which only control needs", w.name)
				}
			}
		}
	}

	// node: its name and its Kubernetes Node's from the downward API, and
	// both of its services on host ports it declares.
	if n, ok := o.role("node"); ok {
		c := n.spec.Containers[0]
		for _, f := range []string{"node-name", "kube-node"} {
			v := flagValue(c, f)
			e := envVar(c, strings.TrimSuffix(strings.TrimPrefix(v, "$("), ")"))
			if !strings.HasPrefix(v, "$(") || e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
				fail("%s: --%s=%s is not the Pod's spec.nodeName (downward API)", n.name, f, v)
			}
		}
		for _, f := range []string{"grpc-addr", "tunnel-addr"} {
			v := flagValue(c, f)
			i := strings.LastIndex(v, ":")
			port, err := strconv.Atoi(v[i+1:])
			if i < 0 || err != nil || !strings.HasPrefix(v, "$(HOST_IP)") {
				fail("%s: --%s=%q: want $(HOST_IP):PORT, the address control and edges reach", n.name, f, v)
				continue
			}
			declared := false
			for _, p := range c.Ports {
				if p.ContainerPort == int32(port) && (p.HostPort == 0 || p.HostPort == p.ContainerPort) {
					declared = true
				}
			}
			if !declared {
				fail("%s: --%s port %d is not a declared container port", n.name, f, port)
			}
		}
		// kiln node refuses a certificate issued to another name: one
		// pair per node, picked by its name.
		for _, f := range []string{"cluster-cert", "cluster-key"} {
			if !strings.Contains(flagValue(c, f), "$(NODE_NAME)") {
				fail("%s: --%s=%s is the same file on every host; kiln node needs the certificate issued to its own name ($(NODE_NAME))", n.name, f, flagValue(c, f))
			}
		}
		if e := envVar(c, "HOST_IP"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "status.hostIP" {
			fail("%s: HOST_IP is not the Pod's status.hostIP", n.name)
		}
	}
}

// flagValue is the value of --name=VALUE in c's arguments ("" if absent).
func flagValue(c corev1.Container, name string) string {
	for _, a := range c.Args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

func envVar(c corev1.Container, name string) *corev1.EnvVar {
	for i, e := range c.Env {
		if e.Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

// secretFile resolves a file path in container c to the Secret and key
// it comes from ("", "" if it is not in a mounted Secret).
func secretFile(w workload, c corev1.Container, path string) (secret, key string) {
	if path == "" {
		return "", ""
	}
	for _, m := range c.VolumeMounts {
		rel, ok := strings.CutPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/")
		if !ok {
			continue
		}
		for _, v := range w.spec.Volumes {
			if v.Name != m.Name || v.Secret == nil {
				continue
			}
			if len(v.Secret.Items) == 0 {
				return v.Secret.SecretName, rel
			}
			for _, it := range v.Secret.Items {
				if it.Path == rel {
					return v.Secret.SecretName, it.Key
				}
			}
		}
	}
	return "", ""
}

func checkPDB(o *objects, w workload, fail func(string, ...any)) {
	for _, p := range o.pdbs {
		sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(w.labels)) {
			continue
		}
		switch {
		case p.Spec.MinAvailable != nil && p.Spec.MinAvailable.Type == intstr.Int:
			if m := p.Spec.MinAvailable.IntVal; m < 1 || (w.replicas > 0 && m >= w.replicas) {
				fail("PodDisruptionBudget %s: minAvailable %d of %d replicas blocks drains or keeps none", p.Name, m, w.replicas)
			}
		case p.Spec.MaxUnavailable != nil && p.Spec.MaxUnavailable.Type == intstr.Int:
			if m := p.Spec.MaxUnavailable.IntVal; m < 1 || (w.replicas > 0 && m >= w.replicas) {
				fail("PodDisruptionBudget %s: maxUnavailable %d of %d replicas", p.Name, m, w.replicas)
			}
		default:
			fail("PodDisruptionBudget %s: use an integer minAvailable or maxUnavailable", p.Name)
		}
		return
	}
	fail("%s: no PodDisruptionBudget selects its pods", w.name)
}

func onKVMHosts(s *corev1.PodSpec) bool {
	if s.NodeSelector["kiln.dev/kvm"] == "true" {
		return true
	}
	if s.Affinity == nil || s.Affinity.NodeAffinity == nil || s.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return false
	}
	terms := s.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms
	for _, t := range terms {
		ok := false
		for _, e := range t.MatchExpressions {
			if e.Key == "kiln.dev/kvm" && e.Operator == corev1.NodeSelectorOpIn && slices.Equal(e.Values, []string{"true"}) {
				ok = true
			}
		}
		if !ok {
			return false // the terms are ORed: every one must require KVM
		}
	}
	return len(terms) > 0
}

func hostPathVolume(s *corev1.PodSpec, path string) *corev1.Volume {
	for i, v := range s.Volumes {
		if v.HostPath != nil && filepath.Clean(v.HostPath.Path) == path {
			return &s.Volumes[i]
		}
	}
	return nil
}

func mountOf(c corev1.Container, volume string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if m.Name == volume {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

func selects(sel, lbls map[string]string) bool {
	return len(sel) > 0 && labels.SelectorFromSet(sel).Matches(labels.Set(lbls))
}

func containerPort(s *corev1.PodSpec, p intstr.IntOrString) bool {
	for _, c := range s.Containers {
		for _, cp := range c.Ports {
			if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
				return true
			}
		}
	}
	return false
}

// pinned: a tag other than latest, or a digest.
func pinned(image string) bool {
	if strings.Contains(image, "@sha256:") {
		return true
	}
	name := image[strings.LastIndex(image, "/")+1:]
	i := strings.LastIndex(name, ":")
	return i > 0 && name[i+1:] != "" && name[i+1:] != "latest"
}

// TestKustomizationsKeepInvariants renders every kustomization and holds
// it to the invariants.
func TestKustomizationsKeepInvariants(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			o := render(t, dir)
			if o.namespace != "kiln" {
				t.Errorf("namespace %q, want kiln", o.namespace)
			}
			for _, b := range check(o) {
				t.Error(b)
			}
		})
	}
}

// TestExampleOverlayApplies: the overlay's changes reach the rendered
// objects (a patch whose target name drifted would be an error, but an
// image override that matches nothing is silently ignored).
func TestExampleOverlayApplies(t *testing.T) {
	o := render(t, "overlays/example")
	for _, w := range o.workloads() {
		for _, c := range w.spec.Containers {
			if !strings.HasPrefix(c.Image, "registry.example.com/kiln:") {
				t.Errorf("%s/%s: image %s: the overlay's image override did not apply", w.name, c.Name, c.Image)
			}
		}
	}
	if c, _ := o.role("control"); c.replicas != 3 {
		t.Errorf("control replicas %d, want the overlay's 3", c.replicas)
	}
	if len(o.configMaps) != 1 || o.configMaps[0].Data["domain"] != "sandbox.example.com" {
		t.Errorf("config maps: %+v", o.configMaps)
	}
}

// TestChecksCatchBrokenManifests: each invariant bites. The base renders
// clean; each mutation below breaks one invariant and must be reported.
func TestChecksCatchBrokenManifests(t *testing.T) {
	base := render(t, "base").renderedYAML
	for _, c := range []struct {
		name   string
		break_ func(o *objects)
		want   string
	}{
		{"node not privileged", func(o *objects) { *o.daemonSets[0].Spec.Template.Spec.Containers[0].SecurityContext.Privileged = false }, "is not privileged"},
		{"node on any host", func(o *objects) { delete(o.daemonSets[0].Spec.Template.Spec.NodeSelector, "kiln.dev/kvm") }, "kiln.dev/kvm=true"},
		{"node without hostPID", func(o *objects) { o.daemonSets[0].Spec.Template.Spec.HostPID = false }, "hostPID is off"},
		{"no /dev/kvm", func(o *objects) { dropHostPath(o, "/dev/kvm") }, "no hostPath volume for /dev/kvm"},
		{"node without --cgroup-root", func(o *objects) {
			c := &o.daemonSets[0].Spec.Template.Spec.Containers[0]
			c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--cgroup-root") })
		}, "lacks --cgroup-root"},
		{"netns not bidirectional", func(o *objects) {
			for i, m := range o.daemonSets[0].Spec.Template.Spec.Containers[0].VolumeMounts {
				if m.MountPath == "/run/netns" {
					o.daemonSets[0].Spec.Template.Spec.Containers[0].VolumeMounts[i].MountPropagation = nil
				}
			}
		}, "want mount propagation Bidirectional"},
		{"one control replica", func(o *objects) { *deployment(o, "control").Spec.Replicas = 1 }, "want at least 2"},
		{"no control PDB", func(o *objects) {
			o.pdbs = slices.DeleteFunc(o.pdbs, func(p *policyv1.PodDisruptionBudget) bool { return p.Name == "kiln-control" })
		}, "no PodDisruptionBudget"},
		{"edge on 8443 only", func(o *objects) {
			for _, s := range o.services {
				for i := range s.Spec.Ports {
					if s.Spec.Ports[i].Port == 443 {
						s.Spec.Ports[i].Port = 8443
					}
				}
			}
		}, "exposes port 443"},
		{"control advertises 8443", func(o *objects) {
			c := &deployment(o, "control").Spec.Template.Spec.Containers[0]
			c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--endpoint-addr") })
		}, "endpoint URLs would name a port"},
		{"no memory limit", func(o *objects) {
			delete(deployment(o, "edge").Spec.Template.Spec.Containers[0].Resources.Limits, corev1.ResourceMemory)
		}, "no memory limit"},
		{"no readiness probe", func(o *objects) { deployment(o, "control").Spec.Template.Spec.Containers[0].ReadinessProbe = nil }, "liveness and a readiness probe"},
		{"latest tag", func(o *objects) { o.daemonSets[0].Spec.Template.Spec.Containers[0].Image = "kiln:latest" }, "is latest"},
		{"untagged", func(o *objects) {
			deployment(o, "edge").Spec.Template.Spec.Containers[0].Image = "registry.example.com:5000/kiln"
		}, "no version tag"},
		{"wider RBAC", func(o *objects) { o.roles[0].Rules[0].Verbs = append(o.roles[0].Rules[0].Verbs, "update") }, "grants /nodes:update"},
		{"secrets RBAC", func(o *objects) {
			o.roles[0].Rules = append(o.roles[0].Rules, rbacv1.PolicyRule{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"get"}})
		}, "grants /secrets:get"},
		{"control bound to RBAC", func(o *objects) {
			o.bindings[0].Subjects = append(o.bindings[0].Subjects, rbacv1.Subject{Kind: "ServiceAccount", Name: "kiln-control", Namespace: "kiln"})
		}, "only node's service account"},
		{"edge gets a token", func(o *objects) {
			t := true
			deployment(o, "edge").Spec.Template.Spec.AutomountServiceAccountToken = &t
		}, "mounts an API token"},
		{"control gets a token", func(o *objects) {
			t := true
			deployment(o, "control").Spec.Template.Spec.AutomountServiceAccountToken = &t
		}, "mounts an API token"},
		{"node without a token", func(o *objects) {
			f := false
			o.daemonSets[0].Spec.Template.Spec.AutomountServiceAccountToken = &f
		}, "cordon watcher cannot read its Node"},
		{"RBAC without watch", func(o *objects) { o.roles[0].Rules[0].Verbs = []string{"get"} }, "does not grant /nodes:watch"},
		{"control without --token-key", func(o *objects) { dropArg(&deployment(o, "control").Spec.Template.Spec.Containers[0], "token-key") }, "--token-key is not the key token.key"},
		{"edge's token key elsewhere", func(o *objects) {
			s := &deployment(o, "edge").Spec.Template.Spec
			for i := range s.Volumes {
				if s.Volumes[i].Secret != nil && s.Volumes[i].Secret.SecretName == "kiln-keys" {
					s.Volumes[i].Secret.SecretName = "kiln-edge-keys"
				}
			}
		}, "is not control's token key"},
		{"control's own random sealing key", func(o *objects) { dropArg(&deployment(o, "control").Spec.Template.Spec.Containers[0], "sealing-key") }, "--sealing-key is not the key secrets.key"},
		{"edge gets the sealing key", func(o *objects) {
			s := &deployment(o, "edge").Spec.Template.Spec
			for i := range s.Volumes {
				if s.Volumes[i].Secret != nil && s.Volumes[i].Secret.SecretName == "kiln-keys" {
					s.Volumes[i].Secret.Items = append(s.Volumes[i].Secret.Items, corev1.KeyToPath{Key: "secrets.key", Path: "secrets.key"})
				}
			}
		}, "only control needs"},
		{"node without a tunnel port", func(o *objects) {
			c := &o.daemonSets[0].Spec.Template.Spec.Containers[0]
			c.Ports = slices.DeleteFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == 7071 })
		}, "--tunnel-addr port 7071 is not a declared container port"},
		{"node without --tunnel-addr", func(o *objects) { dropArg(&o.daemonSets[0].Spec.Template.Spec.Containers[0], "tunnel-addr") }, "--tunnel-addr=\"\""},
		{"node name by hand", func(o *objects) {
			c := &o.daemonSets[0].Spec.Template.Spec.Containers[0]
			dropArg(c, "node-name")
			c.Args = append(c.Args, "--node-name=host-1")
		}, "--node-name=host-1 is not the Pod's spec.nodeName"},
		{"one certificate for every node", func(o *objects) {
			c := &o.daemonSets[0].Spec.Template.Spec.Containers[0]
			dropArg(c, "cluster-cert")
			c.Args = append(c.Args, "--cluster-cert=/etc/kiln/cluster/tls.crt")
		}, "needs the certificate issued to its own name"},
		{"store URL in the arguments", func(o *objects) {
			c := &deployment(o, "edge").Spec.Template.Spec.Containers[0]
			c.Args = append(c.Args, "--store=postgres://kiln:pw@db/kiln")
		}, "shows the PostgreSQL password"},
		{"edge with control's certificate", func(o *objects) {
			s := &deployment(o, "edge").Spec.Template.Spec
			for i := range s.Volumes {
				if s.Volumes[i].Secret != nil && s.Volumes[i].Secret.SecretName == "kiln-cluster-edge" {
					s.Volumes[i].Secret.SecretName = "kiln-cluster-control"
				}
			}
		}, "not a file of the Secret kiln-cluster-edge"},
		{"unreadable secret", func(o *objects) {
			m := int32(0o400)
			deployment(o, "edge").Spec.Template.Spec.Volumes[1].Secret.DefaultMode = &m
		}, "unreadable by its non-root user"},
		{"privileged edge", func(o *objects) {
			t := true
			deployment(o, "edge").Spec.Template.Spec.Containers[0].SecurityContext.Privileged = &t
		}, "must not be privileged"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := decodeRendered(t, "base", base)
			if bad := check(o); len(bad) > 0 {
				t.Fatalf("base already fails: %v", bad)
			}
			c.break_(o)
			bad := check(o)
			if !slices.ContainsFunc(bad, func(s string) bool { return strings.Contains(s, c.want) }) {
				t.Fatalf("broken manifest not caught (want %q): %v", c.want, bad)
			}
		})
	}
}

func deployment(o *objects, role string) *appsv1.Deployment {
	for _, d := range o.deployments {
		if d.Spec.Template.Spec.Containers[0].Args[0] == role {
			return d
		}
	}
	panic("no deployment runs kiln " + role)
}

func dropArg(c *corev1.Container, name string) {
	c.Args = slices.DeleteFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, "--"+name+"=") })
}

func dropHostPath(o *objects, path string) {
	s := &o.daemonSets[0].Spec.Template.Spec
	s.Volumes = slices.DeleteFunc(s.Volumes, func(v corev1.Volume) bool { return v.HostPath != nil && v.HostPath.Path == path })
}
