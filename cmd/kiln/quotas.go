package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

func init() {
	quotas := &cobra.Command{Use: "quotas", Short: "Show and set per-account quotas (the server's --quota-* flags are the defaults)"}

	var o store.QuotaOverride
	var reset bool
	set := &cobra.Command{
		Use:   "set ACCOUNT",
		Short: "Set an account's limits (given flags only; a negative value is no limit, --reset goes back to the defaults); takes effect at once",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			account := args[0]
			if !server.ValidAccount(account) {
				return fmt.Errorf("ACCOUNT must be 12 digits, not %q", account)
			}
			ctx := cmd.Context()
			st, err := openStore(ctx, dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			cur := store.QuotaOverride{}
			if !reset {
				if cur, err = st.GetQuotaOverride(ctx, account); err != nil {
					return err
				}
			}
			fl := cmd.Flags()
			for _, f := range []struct {
				name string
				dst  **int64
				v    *int64
			}{
				{"microvms", &cur.Microvms, o.Microvms},
				{"memory-mib", &cur.MemoryMiB, o.MemoryMiB},
				{"vcpus", &cur.VCPUs, o.VCPUs},
				{"builds", &cur.Builds, o.Builds},
				{"storage-bytes", &cur.StorageBytes, o.StorageBytes},
			} {
				if fl.Changed(f.name) {
					n := *f.v
					*f.dst = &n
				}
			}
			if err := st.SetQuotaOverride(ctx, account, cur); err != nil {
				return err
			}
			return printQuotas(cmd, st, []string{account})
		},
	}
	o = store.QuotaOverride{Microvms: new(int64), MemoryMiB: new(int64), VCPUs: new(int64), Builds: new(int64), StorageBytes: new(int64)}
	set.Flags().Int64Var(o.Microvms, "microvms", 0, "microVMs not terminated")
	set.Flags().Int64Var(o.MemoryMiB, "memory-mib", 0, "guest memory MiB of microVMs not terminated")
	set.Flags().Int64Var(o.VCPUs, "vcpus", 0, "vCPUs of microVMs not terminated")
	set.Flags().Int64Var(o.Builds, "builds", 0, "image builds pending or running at once")
	set.Flags().Int64Var(o.StorageBytes, "storage-bytes", 0, "bytes of build snapshots and uploaded code packages")
	set.Flags().BoolVar(&reset, "reset", false, "drop the account's earlier settings first (alone: back to the defaults)")

	get := &cobra.Command{
		Use:   "get [ACCOUNT]",
		Short: "Show the limits and usage of an account (default: every account with keys or settings)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			st, err := openStore(ctx, dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			accounts := args
			if len(accounts) == 0 {
				seen := map[string]bool{}
				ks, err := st.ListAccessKeys(ctx)
				if err != nil {
					return err
				}
				for _, k := range ks {
					seen[k.Account] = true
				}
				ovs, err := st.ListQuotaOverrides(ctx)
				if err != nil {
					return err
				}
				for a := range ovs {
					seen[a] = true
				}
				for a := range seen {
					accounts = append(accounts, a)
				}
				sort.Strings(accounts)
			}
			return printQuotas(cmd, st, accounts)
		},
	}
	quotas.AddCommand(set, get)
	rootCmd.AddCommand(quotas)
}

// printQuotas prints, per account, each quota's limit (with "set" when
// the account's own) and its use. Storage use here is what the store
// records (build snapshots); the server adds uploads when it checks.
func printQuotas(cmd *cobra.Command, st store.Store, accounts []string) error {
	ctx := cmd.Context()
	def := api.DefaultQuota
	if v, err := st.GetSetting(ctx, server.SettingQuotaDefaults); err == nil {
		if err := json.Unmarshal([]byte(v), &def); err != nil {
			return fmt.Errorf("reading the server's quota defaults: %w", err)
		}
	} else if !errors.Is(err, errdefs.ErrNotFound) {
		return err
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ACCOUNT\tQUOTA\tLIMIT\tIN USE")
	for _, a := range accounts {
		o, err := st.GetQuotaOverride(ctx, a)
		if err != nil {
			return err
		}
		q := o.Apply(def)
		u, err := st.QuotaUsage(ctx, a)
		if err != nil {
			return err
		}
		for _, r := range []struct {
			name        string
			set         bool
			limit, used int64
		}{
			{store.QuotaMicrovms, o.Microvms != nil, q.Microvms, u.Microvms},
			{store.QuotaMemoryMiB, o.MemoryMiB != nil, q.MemoryMiB, u.MemoryMiB},
			{store.QuotaVCPUs, o.VCPUs != nil, q.VCPUs, u.VCPUs},
			{store.QuotaBuilds, o.Builds != nil, q.Builds, u.Builds},
			{store.QuotaStorageBytes, o.StorageBytes != nil, q.StorageBytes, u.StorageBytes},
		} {
			lim := fmt.Sprint(r.limit)
			if r.limit < 0 {
				lim = "none"
			}
			if r.set {
				lim += " (set)"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", a, r.name, lim, r.used)
		}
	}
	return tw.Flush()
}
