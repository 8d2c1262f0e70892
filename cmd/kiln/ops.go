package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// The operation commands mirror `aws lambda-microvms`: one command per API
// operation, with the same kebab-case flags, built from awscli.Operations.
func init() {
	rootCmd.AddGroup(&cobra.Group{ID: "ops", Title: "API operations (as in `aws lambda-microvms`):"})
	for _, op := range awscli.Operations {
		cmd := awscli.Command(op, func() string { return dataDir })
		cmd.GroupID = "ops"
		rootCmd.AddCommand(cmd)
	}
	rootCmd.AddCommand(logsCommand())
}

// logsCommand prints (and with -f follows) the build logs of an image
// version: `kiln logs IMAGE[:VERSION]`.
func logsCommand() *cobra.Command {
	var s awscli.Settings
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs MICROVM_ID | IMAGE[:VERSION]",
		Short: "Print a microVM's log, or the build log of an image version (latest by default); -f follows it",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if s.CredentialsFile == "" {
				s.CredentialsFile = awscli.DefaultCredentialsFile(dataDir)
			}
			c, err := awscli.Connect(s)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if strings.HasPrefix(args[0], "mvm-") || strings.Contains(args[0], ":microvm:") {
				var off int64
				for {
					state, err := awscli.FollowMicrovmLog(ctx, c, args[0], &off, cmd.OutOrStdout())
					if err != nil {
						return err
					}
					if !follow || state == "TERMINATED" {
						return nil
					}
					select {
					case <-ctx.Done():
						return nil
					case <-time.After(500 * time.Millisecond):
					}
				}
			}
			image, version, _ := strings.Cut(args[0], ":")
			if strings.HasPrefix(args[0], "arn:") {
				image, version = args[0], ""
			}
			if version == "" {
				img, err := awscli.Call(ctx, c, awscli.Find("GetMicrovmImage"), map[string]any{"imageIdentifier": image})
				if err != nil {
					return err
				}
				vs, err := awscli.Call(ctx, c, awscli.Find("ListMicrovmImageVersions"), map[string]any{"imageIdentifier": image})
				if err != nil {
					return err
				}
				items, _ := vs["items"].([]any)
				if len(items) == 0 {
					return fmt.Errorf("image %v has no versions", img["name"])
				}
				last, _ := items[len(items)-1].(map[string]any)
				version, _ = last["imageVersion"].(string)
			}
			offsets := map[string]int64{}
			for {
				done := awscli.FollowBuildLogs(ctx, c, image, version, offsets, cmd.OutOrStdout())
				if !follow || done {
					return nil
				}
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(500 * time.Millisecond):
				}
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the builds finish")
	awscli.AddSettingsFlags(cmd, &s)
	return cmd
}
