package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/auth"
	"github.com/kiln-sandbox/kiln/internal/e2b"
	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

func init() {
	keys := &cobra.Command{Use: "keys", Short: "Manage API access keys (each belongs to an account)"}

	var account, description, credFile, profile string
	var e2bKey bool
	create := &cobra.Command{
		Use:   "create",
		Short: "Create an access key, for a new account unless --account is given; prints it as JSON",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			st, err := openStore(ctx, dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			if e2bKey {
				return createE2BKey(cmd.Context(), cmd.OutOrStdout(), st, account, description)
			}
			if account == "" {
				if account, err = auth.NewAccountID(); err != nil {
					return err
				}
			} else if !server.ValidAccount(account) {
				return fmt.Errorf("--account must be 12 digits")
			}
			k, err := auth.NewAccessKey(account, description)
			if err != nil {
				return err
			}
			if err := st.CreateAccessKey(ctx, k); err != nil {
				return err
			}
			if credFile != "" {
				if err := auth.WriteCredentials(credFile, profile, k); err != nil {
					return err
				}
			}
			enc := json.NewEncoder(os.Stdout)
			enc.SetIndent("", "    ")
			return enc.Encode(map[string]string{"accessKeyId": k.ID, "secretAccessKey": k.Secret, "account": k.Account, "description": k.Description})
		},
	}
	create.Flags().StringVar(&account, "account", "", "12-digit account to add the key to (default: a new account)")
	create.Flags().StringVar(&description, "description", "", "what the key is for")
	create.Flags().StringVar(&credFile, "write-credentials", "", "also write the key to this AWS shared-credentials file (replaced)")
	create.Flags().StringVar(&profile, "profile", "default", "profile name in --write-credentials")
	create.Flags().BoolVar(&e2bKey, "e2b", false, "create an API key of the E2B-compatible API (E2B_API_KEY) instead, for --account or a new account; prints {\"e2bApiKey\": ...}")

	list := &cobra.Command{
		Use:   "list",
		Short: "List access keys (without secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := openStore(cmd.Context(), dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			ks, err := st.ListAccessKeys(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ACCESS KEY ID\tACCOUNT\tCREATED\tDESCRIPTION")
			for _, k := range ks {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", k.ID, k.Account, k.CreatedAt.Format(time.RFC3339), k.Description)
			}
			return tw.Flush()
		},
	}

	del := &cobra.Command{
		Use:   "delete ACCESS_KEY_ID",
		Short: "Delete an access key (a running server stops accepting it within seconds)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(cmd.Context(), dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			// Deleting a key changes no one's privileges: the operator
			// account is recorded apart from keys and stays the operator.
			return st.DeleteAccessKey(cmd.Context(), args[0])
		},
	}
	keys.AddCommand(create, list, del)
	rootCmd.AddCommand(keys)
}

// createE2BKey stores the hash of a new E2B API key for account (a new
// account when empty) and prints the key to out, which is shown only here.
func createE2BKey(ctx context.Context, out io.Writer, st store.Store, account, description string) error {
	if account == "" {
		var err error
		if account, err = auth.NewAccountID(); err != nil {
			return err
		}
	} else if !server.ValidAccount(account) {
		return fmt.Errorf("--account must be 12 digits")
	}
	key, hash, err := e2b.NewAPIKey()
	if err != nil {
		return err
	}
	if err := st.CreateE2BKey(ctx, store.E2BKey{Hash: hash, Account: account, Prefix: e2b.KeyPrefixOf(key),
		Description: description, CreatedAt: time.Now().UTC()}); err != nil {
		return err
	}
	enc := json.NewEncoder(out)
	enc.SetIndent("", "    ")
	return enc.Encode(map[string]string{"e2bApiKey": key, "account": account, "description": description})
}
