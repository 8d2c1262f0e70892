package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/kiln-sandbox/kiln/internal/applog"
	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/server"
)

func init() {
	rootCmd.AddCommand(eventsCommand(), usageCommand())
}

// addLogFlags adds the `kiln server` flags of durable microVM logs.
func addLogFlags(f *pflag.FlagSet, o *server.Options) {
	f.Int64Var(&o.LogMaxBytes, "log-max-bytes", applog.DefaultMaxBytes, "bytes of console and app output kept per microVM (the newest, in 4 rotated files)")
	f.DurationVar(&o.LogRetention, "log-retention", applog.DefaultRetention, "how long a microVM's log stays after it ended")
}

func connectCLI(s *awscli.Settings) (*awscli.Client, error) {
	if s.CredentialsFile == "" {
		s.CredentialsFile = awscli.DefaultCredentialsFile(dataDir)
	}
	return awscli.Connect(*s)
}

// eventsCommand lists the lifecycle events of a microVM or image version.
func eventsCommand() *cobra.Command {
	var s awscli.Settings
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "events MICROVM_ID | IMAGE[:VERSION]",
		Short: "List the state changes of a microVM, or of an image's versions, with their times and reasons",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := connectCLI(&s)
			if err != nil {
				return err
			}
			path, q := "", url.Values{}
			if strings.HasPrefix(args[0], "mvm-") || strings.Contains(args[0], ":microvm:") {
				path = "/kiln/v1/microvms/" + url.PathEscape(args[0]) + "/events"
			} else {
				image, version := args[0], ""
				if !strings.HasPrefix(image, "arn:") {
					image, version, _ = strings.Cut(args[0], ":")
				}
				path = "/kiln/v1/microvm-images/" + url.PathEscape(image) + "/events"
				if version != "" {
					q.Set("imageVersion", version)
				}
			}
			type event struct {
				Kind     string  `json:"kind"`
				Resource string  `json:"resource"`
				Version  string  `json:"version,omitempty"`
				From     string  `json:"from,omitempty"`
				State    string  `json:"state"`
				Reason   string  `json:"reason,omitempty"`
				At       float64 `json:"at"`
			}
			var all []event
			for {
				data, err := c.Do(cmd.Context(), "GET", path, q, nil)
				if err != nil {
					return err
				}
				var page struct {
					Events    []event `json:"events"`
					NextToken string  `json:"nextToken"`
				}
				if err := json.Unmarshal(data, &page); err != nil {
					return fmt.Errorf("decoding events: %w", err)
				}
				all = append(all, page.Events...)
				if page.NextToken == "" {
					break
				}
				q.Set("nextToken", page.NextToken)
			}
			out := cmd.OutOrStdout()
			if asJSON {
				b, _ := json.MarshalIndent(map[string]any{"events": all}, "", "  ")
				fmt.Fprintln(out, string(b))
				return nil
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "TIME\tRESOURCE\tFROM\tSTATE\tREASON")
			for _, e := range all {
				res := e.Resource
				if e.Version != "" {
					res += ":" + e.Version
				}
				at := time.Unix(0, int64(e.At*1e9)).UTC().Format("2006-01-02T15:04:05.000Z")
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", at, res, or(e.From, "-"), e.State, e.Reason)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	awscli.AddSettingsFlags(cmd, &s)
	return cmd
}

func or(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// usageCommand prints metered usage as JSON.
func usageCommand() *cobra.Command {
	var s awscli.Settings
	var account, since, until string
	cmd := &cobra.Command{
		Use:   "usage [--account A] [--since T]",
		Short: "Print metered usage as JSON: vCPU- and GiB-seconds running, GiB-seconds suspended, builds, stored bytes",
		Long: `Print metered usage per account as JSON. A tenant sees its own account;
the operator any (--account) or all (no --account). --since and --until take
RFC 3339, seconds since the epoch, or a duration back from now (24h, 7d).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := connectCLI(&s)
			if err != nil {
				return err
			}
			q := url.Values{}
			for k, v := range map[string]string{"account": account, "since": since, "until": until} {
				if v != "" {
					q.Set(k, v)
				}
			}
			data, err := c.Do(cmd.Context(), "GET", "/kiln/v1/usage", q, nil)
			if err != nil {
				return err
			}
			var buf bytes.Buffer
			if err := json.Indent(&buf, data, "", "  "); err != nil {
				return fmt.Errorf("decoding usage: %w", err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), buf.String())
			return nil
		},
	}
	cmd.Flags().StringVar(&account, "account", "", "account to report (operator only; default: your own, or all for the operator)")
	cmd.Flags().StringVar(&since, "since", "", "start of the window (default: all time)")
	cmd.Flags().StringVar(&until, "until", "", "end of the window (default: now)")
	awscli.AddSettingsFlags(cmd, &s)
	return cmd
}
