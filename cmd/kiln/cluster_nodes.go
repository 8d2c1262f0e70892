package main

import (
	"context"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// `kiln cluster`: the operator's view of the nodes, straight from the
// store (--store), so it works with every control replica down.
func init() {
	cl := &cobra.Command{Use: "cluster", Short: "Show a cluster's nodes and cordon them (reads and writes the store: --store)"}
	cl.AddCommand(&cobra.Command{
		Use:   "nodes",
		Short: "List the nodes: state, cordon, guest memory committed of capacity, lease",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withCluster(cmd, func(ctx context.Context, cs store.Cluster) error {
				nodes, err := cs.ListNodes(ctx)
				if err != nil {
					return err
				}
				printNodes(cmd, nodes, time.Now())
				return nil
			})
		},
	})
	for _, c := range []struct {
		use, short string
		cordoned   bool
	}{
		{"cordon NAME", "Give a node no new microVMs (those it runs keep running)", true},
		{"uncordon NAME", "Let placement use a node again", false},
	} {
		cl.AddCommand(&cobra.Command{
			Use:   c.use,
			Short: c.short,
			Long: c.short + `. On a node that follows a Kubernetes Node (kiln node in a
Pod), use kubectl cordon/uncordon instead: the node writes the Node's cordon
to the store whenever it changes, over what this command wrote.`,
			Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return withCluster(cmd, func(ctx context.Context, cs store.Cluster) error {
					if err := cs.SetNodeCordoned(ctx, args[0], c.cordoned); err != nil {
						return err
					}
					n, err := cs.GetNode(ctx, args[0])
					if err != nil {
						return err
					}
					printNodes(cmd, []store.Node{n}, time.Now())
					return nil
				})
			},
		})
	}
	rootCmd.AddCommand(cl)
}

func withCluster(cmd *cobra.Command, f func(context.Context, store.Cluster) error) error {
	ctx := cmd.Context()
	st, err := openStore(ctx, dataDir)
	if err != nil {
		return err
	}
	defer st.Close()
	cs, err := server.ClusterStore(st)
	if err != nil {
		return err
	}
	return f(ctx, cs)
}

func printNodes(cmd *cobra.Command, nodes []store.Node, now time.Time) {
	w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSTATE\tCORDONED\tCOMMITTED/CAPACITY MiB\tLEASE")
	for _, n := range nodes {
		cordoned := "no"
		if n.Cordoned {
			cordoned = "yes"
		}
		lease := "expires in " + n.LeaseExpiresAt.Sub(now).Round(time.Second).String()
		if !n.LeaseExpiresAt.After(now) {
			lease = "expired " + now.Sub(n.LeaseExpiresAt).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d/%d\t%s\n", n.Name, n.State, cordoned, n.CommittedMiB, n.CapacityMiB, lease)
	}
	w.Flush()
}
