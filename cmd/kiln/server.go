package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/egress"
	"github.com/kiln-sandbox/kiln/internal/gc"
	"github.com/kiln-sandbox/kiln/internal/server"
)

// `kiln server`, `kiln control` and `kiln node` parse their flags here;
// internal/server assembles and runs what they name.
func init() {
	var sf serverFlags
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Serve the AWS Lambda MicroVMs-compatible API",
		Long: `Serve the API. On first start it creates an admin access key and writes it
to DATA_DIR/credentials in the AWS shared-credentials format, so that
  AWS_SHARED_CREDENTIALS_FILE=DATA_DIR/credentials AWS_ENDPOINT_URL=http://API_ADDR
is all an AWS SDK or CLI needs. That admin account is recorded as the
operator's, the one account that may build from host paths
(--operator-account names another).

DATA_DIR is kept 0700 and its key files and database 0600; secret access
keys are sealed in the database with DATA_DIR/secrets.key (back it up with
the database: without it the stored keys cannot be used).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return sf.run(cmd, "")
		},
	}
	sf.add(cmd.Flags())
	rootCmd.AddCommand(cmd)
}

// serverFlags are the flags `kiln server` shares with the cluster roles
// that run its parts (`kiln control`, `kiln node`).
type serverFlags struct {
	o                     server.Options
	denyCIDRs, allowFetch []string
}

// run checks the flags and runs the server in role ("" = everything).
func (sf *serverFlags) run(cmd *cobra.Command, role string) error {
	o, denyCIDRs, allowFetch := sf.o, sf.denyCIDRs, sf.allowFetch
	o.Role = role
	o.DataDir = dataDir
	o.Store, o.SealingKey = storeFlag, sealingKeyFlag
	o.Accel, o.Log = accelFlag, newLogger()
	o.EndpointCert, o.EndpointKey = endpointCert, endpointKey
	var err error
	if o.DenyCIDRs, err = egress.ParseCIDRs(denyCIDRs); err != nil {
		return fmt.Errorf("--deny-cidr: %w", err)
	}
	if o.AllowFetchCIDRs, err = egress.ParseCIDRs(allowFetch); err != nil {
		return fmt.Errorf("--allow-fetch-cidr: %w", err)
	}
	if o.DefaultEgress != "none" && o.DefaultEgress != "internet" {
		return fmt.Errorf("--default-egress %q: want none or internet", o.DefaultEgress)
	}
	for _, r := range o.InsecureRegistries {
		if r == "" || strings.ContainsAny(r, "/ ") {
			return fmt.Errorf("--insecure-registry %q: want HOST:PORT or HOST", r)
		}
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return server.Run(ctx, o)
}

func (sf *serverFlags) add(f *pflag.FlagSet) {
	o := &sf.o
	backend, denyCIDRs, allowFetch := &o.Backend, &sf.denyCIDRs, &sf.allowFetch
	f.StringVar(&o.APIAddr, "api-addr", "127.0.0.1:9090", "address of the API")
	f.StringVar(&o.EndpointAddr, "endpoint-addr", "127.0.0.1:8443", "address of the microVM endpoint proxy (HTTPS)")
	f.StringVar(&o.Domain, "domain", "microvm.localhost", "microVM endpoints are https://ID.DOMAIN")
	f.StringVar(&o.Region, "region", "us-east-1", "region in ARNs")
	f.Int64Var(&o.Quota.Microvms, "max-microvms-per-account", api.DefaultQuota.Microvms, "old name of --quota-microvms")
	f.MarkDeprecated("max-microvms-per-account", "use --quota-microvms")
	f.Int64Var(&o.Quota.Microvms, "quota-microvms", api.DefaultQuota.Microvms, "default quota: microVMs not terminated per account (negative: no limit; `kiln quotas set` changes one account's)")
	f.Int64Var(&o.Quota.MemoryMiB, "quota-memory-mib", api.DefaultQuota.MemoryMiB, "default quota: guest memory MiB of an account's microVMs not terminated")
	f.Int64Var(&o.Quota.VCPUs, "quota-vcpus", api.DefaultQuota.VCPUs, "default quota: vCPUs of an account's microVMs not terminated")
	f.Int64Var(&o.Quota.Builds, "quota-builds", api.DefaultQuota.Builds, "default quota: an account's image builds pending or running at once")
	f.Int64Var(&o.Quota.StorageBytes, "quota-storage-bytes", api.DefaultQuota.StorageBytes, "default quota: bytes of an account's build snapshots (memory and disk) and uploaded code packages")
	f.Float64Var(&o.MemoryOvercommit, "memory-overcommit", 1.0, "guest memory the host may commit to running microVMs and builds, as a ratio of its physical memory; beyond it runs, resumes and builds are refused (0: no check)")
	f.IntVar(&o.MaxConcurrentBuilds, "max-concurrent-builds", 2, "image builds running at once on this host; more wait in a queue")
	f.DurationVar(&o.BuildTimeout, "build-timeout", 60*time.Minute, "longest a whole image build may take before it fails")
	f.IntVar(&o.ClonePool, "clone-pool", 1, "QEMU processes per image version started ahead (jailed, paused, state loaded) so a RunMicrovm skips process start; 0 disables")
	f.Int64Var(&o.BuildLogMaxBytes, "build-log-max-bytes", 10<<20, "bytes of a build's log kept; later output is dropped after a \"truncated\" line")
	f.Float64Var(&o.RequestsPerSecond, "requests-per-second", 0, "API request rate per account before ThrottlingException (0: no limit)")
	f.StringVar(backend, "backend", "engine", "what runs the microVMs: engine, or fake (records only, for trying the API)")
	f.StringArrayVar(denyCIDRs, "deny-cidr", nil, "CIDR (or address) that app VMs, build VMs and kiln's fetches for tenants (ADD <url>, code URIs, registry pulls) may never reach, on top of the built-in deny list; repeatable")
	f.StringArrayVar(allowFetch, "allow-fetch-cidr", nil, "CIDR kiln may fetch from for tenants although the deny list covers it (an internal mirror); never opens guest egress; repeatable")
	f.StringArrayVar(&o.AptMirrors, "apt-mirror", nil, "http:// Debian mirror URI whose downloads by build VMs go through kiln's per-account package cache, besides the http:// mirrors in the host's apt sources; repeatable")
	f.StringArrayVar(&o.InsecureRegistries, "insecure-registry", nil, "registry HOST:PORT (or HOST) pulled over plain HTTP and allowed on a denied address such as loopback; repeatable")
	f.StringVar(&o.OperatorAccount, "operator-account", "", "12-digit account that may build from host paths and file:// URIs (default: the admin account recorded on first start)")
	f.StringVar(&o.APICert, "api-cert", "", "PEM certificate chain: serve the API over HTTPS (with --api-key)")
	f.StringVar(&o.APIKey, "api-key", "", "PEM private key of --api-cert")
	f.IntVar(&o.MaxConnsPerClient, "max-conns-per-client", 256, "concurrent API connections per client address; more are answered 429 and closed (0: no cap)")
	addLogFlags(f, o)
	f.StringVar(&o.NetPool, "net-pool", "", "prefix the VM links' /30s come from (default 10.200.0.0/16)")
	f.Uint32Var(&o.VMUIDBase, "vm-uid-base", 0, "first of the 65536 uids VM processes run as (default 0x6b690000)")
	f.StringVar(&o.CgroupRoot, "cgroup-root", "", "where the host's cgroup file system is mounted; each QEMU gets a cgroup kiln/ID.* there (default /sys/fs/cgroup; in a Pod with a cgroup namespace of its own, mount the host's elsewhere and name it)")
	f.StringVar(&o.HostCgroupNS, "host-cgroupns", "", "the host's cgroup namespace, entered to put QEMU's cgroup outside kiln's own when kiln runs in another (default /proc/1/ns/cgroup, the host's under hostPID; none: never)")
	f.StringVar(&o.RolesFile, "roles-file", "", "JSON file mapping executionRoleArn values to credential sources (a profile of the host's AWS configuration, or an STS AssumeRole), served to each microVM through its metadata service at 169.254.169.254 (IMDSv2); empty: no microVM gets credentials")
	f.StringVar(&o.DefaultEgress, "default-egress", "none", "egress of microVMs and image builds that name no egress connector: none (kiln's default: no network out) or internet (AWS's default: INTERNET_EGRESS, still behind the deny list)")
	f.StringVar(&o.S3Endpoint, "s3-endpoint", "", "S3-compatible endpoint (e.g. http://127.0.0.1:7070) that s3:// code artifacts are read from, with credentials from the standard AWS chain (AWS_ACCESS_KEY_ID..., AWS_PROFILE); empty: AWS's own S3")
	f.StringVar(&o.S3Region, "s3-region", "", "region of --s3-endpoint (default: AWS_REGION or the profile's, then --region)")
	f.BoolVar(&o.S3PathStyle, "s3-path-style", true, "address buckets as ENDPOINT/BUCKET (most self-hosted stores); false: BUCKET.ENDPOINT")
	f.BoolVar(&o.RequireKVM, "require-kvm", false, "refuse to start unless microVMs run under KVM (TCG is not a security boundary)")
	f.StringVar(&o.MetricsAddr, "metrics-addr", "127.0.0.1:9091", "address of /metrics (Prometheus), /healthz and /readyz (empty: off)")
	f.DurationVar(&o.GCInterval, "gc-interval", 10*time.Minute, "how often garbage collection runs (it also runs at start; 0: never)")
	f.DurationVar(&o.TerminatedRetention, "terminated-retention", 24*time.Hour, "how long TERMINATED microVM records and idempotency tokens are kept")
	f.DurationVar(&o.CacheMaxAge, "cache-max-age", 7*24*time.Hour, "how long an unused image-cache or template-cache entry is kept")
	f.DurationVar(&o.TemplateFilesMaxAge, "template-files-max-age", gc.DefaultTemplateFilesMaxAge, "how long E2B template files (the SDK's uploads of COPY files) are kept when no build or files check uses them")
	f.Int64Var(&o.TemplateFilesMaxAccountBytes, "template-files-max-account-bytes", e2b.DefaultMaxAccountUploads, "bytes of E2B template files one account may keep; an upload past it is refused (429) until unused files expire")
}

// endpointCert and endpointKey are persistent flags like --accel: `kiln
// server`'s own flags are above.
var endpointCert, endpointKey string

func init() {
	rootCmd.PersistentFlags().StringVar(&endpointCert, "endpoint-cert", "", "kiln server: PEM certificate chain for the microVM endpoints (default: kiln's own CA, exported to DATA_DIR/ca.pem)")
	rootCmd.PersistentFlags().StringVar(&endpointKey, "endpoint-key", "", "kiln server: PEM private key of --endpoint-cert")
}
