//go:build linux

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/remote"
	"github.com/kiln-sandbox/kiln/internal/tartree"
)

// `kiln exec` and `kiln cp`: a command or a file copy in a microVM, over
// the shell WebSocket kiln shell opens (same token, same SHELL_INGRESS
// connector), which the engine bridges to the guest agent as envd does
// for E2B (internal/remote).
func init() {
	var s awscli.Settings
	var o shellOptions
	var tty, noStdin bool
	var env []string
	var cwd string
	execCmd := &cobra.Command{
		Use:   "exec MICROVM_ID [flags] -- COMMAND [ARG...]",
		Short: "Run a command in a microVM (needs the SHELL_INGRESS network connector); exits with its status",
		Long: "Runs COMMAND as root in the microVM, with stdout and stderr passed through and stdin forwarded\n" +
			"(-n: none), and exits with the command's exit status (128+signal when a signal ended it).\n" +
			"-t runs it on a terminal (stdout and stderr merged), as `kiln shell` does.",
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			shellDefaults(&s, &o)
			code, err := runExec(cmd.Context(), s, args[0], o, execOptions{Argv: args[1:], Env: env, Cwd: cwd, TTY: tty, NoStdin: noStdin,
				Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr})
			if err != nil {
				return err
			}
			if code != 0 {
				os.Exit(code) // the terminal is restored by now
			}
			return nil
		},
	}
	awscli.AddSettingsFlags(execCmd, &s)
	addShellFlags(execCmd, &o)
	execCmd.Flags().BoolVarP(&tty, "tty", "t", false, "run the command on a terminal (raw mode and window size when stdin is one)")
	execCmd.Flags().BoolVarP(&noStdin, "no-stdin", "n", false, "do not forward stdin (the command reads /dev/null)")
	execCmd.Flags().StringArrayVarP(&env, "env", "e", nil, "KEY=VALUE to set in the command's environment (repeatable)")
	execCmd.Flags().StringVarP(&cwd, "workdir", "w", "", "absolute working directory in the microVM (default /)")
	rootCmd.AddCommand(execCmd)

	var cs awscli.Settings
	var co shellOptions
	cpCmd := &cobra.Command{
		Use:   "cp SRC DST",
		Short: "Copy files or directories between this host and a microVM (needs SHELL_INGRESS)",
		Long: "One of SRC and DST is MICROVM_ID:PATH (an absolute path in the microVM), the other a local path.\n" +
			"As with `docker cp`: into an existing directory the copy keeps its name, else it takes DST's.\n" +
			"A local `-` is a tar stream on stdin or stdout. Links are copied as links, never followed.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			shellDefaults(&cs, &co)
			return runCp(cmd.Context(), cs, co, args[0], args[1], os.Stdin, os.Stdout, os.Stderr)
		},
	}
	awscli.AddSettingsFlags(cpCmd, &cs)
	addShellFlags(cpCmd, &co)
	rootCmd.AddCommand(cpCmd)
}

type execOptions struct {
	Argv    []string
	Env     []string
	Cwd     string
	TTY     bool
	NoStdin bool
	Stdin   *os.File
	Stdout  io.Writer
	Stderr  io.Writer
}

// runExec returns the command's exit status.
func runExec(ctx context.Context, s awscli.Settings, id string, o shellOptions, e execOptions) (int, error) {
	if e.Cwd != "" && !path.IsAbs(e.Cwd) {
		return 0, fmt.Errorf("--workdir %q: give an absolute path in the microVM", e.Cwd)
	}
	fd := int(e.Stdin.Fd())
	term := e.TTY && isTerminal(fd)
	cols, rows := termSize(fd, term)
	conn, err := dialShell(ctx, s, id, o, remote.PathExec, nil)
	if err != nil {
		return 0, err
	}
	defer conn.CloseNow()
	var sizes <-chan [2]uint16
	if term {
		restore, err := makeRaw(fd)
		if err != nil {
			return 0, err
		}
		defer restore()
		sizes = winchSizes(ctx, fd)
	}
	var stdin io.Reader
	if !e.NoStdin {
		stdin = e.Stdin
	}
	req := remote.ExecRequest{Argv: e.Argv, Env: e.Env, Cwd: e.Cwd, Stdin: stdin != nil, TTY: e.TTY, Cols: cols, Rows: rows}
	return remote.Exec(ctx, conn, req, stdin, e.Stdout, e.Stderr, sizes)
}

// remotePath splits MICROVM_ID:PATH; ok is false for a local path (one
// whose part before the first colon is empty or holds a slash).
func remotePath(arg string) (id, p string, ok bool) {
	id, p, ok = strings.Cut(arg, ":")
	if !ok || id == "" || strings.Contains(id, "/") {
		return "", "", false
	}
	return id, p, true
}

func runCp(ctx context.Context, s awscli.Settings, o shellOptions, src, dst string, stdin io.Reader, stdout, stderr io.Writer) error {
	sid, spath, sRemote := remotePath(src)
	did, dpath, dRemote := remotePath(dst)
	if sRemote == dRemote {
		return errors.New("cp: exactly one of SRC and DST must be MICROVM_ID:PATH (a local path with a colon needs a ./ in front)")
	}
	if sRemote {
		if !path.IsAbs(spath) {
			return fmt.Errorf("cp: %q: give an absolute path in the microVM", src)
		}
		conn, err := dialShell(ctx, s, sid, o, remote.PathCopyOut, nil)
		if err != nil {
			return err
		}
		defer conn.CloseNow()
		if dst == "-" {
			return remote.CopyOut(ctx, conn, spath, stdout)
		}
		pr, pw := io.Pipe()
		copied := make(chan error, 1)
		go func() {
			err := remote.CopyOut(ctx, conn, spath, pw)
			pw.CloseWithError(err)
			copied <- err
		}()
		err = remote.ReceiveTree(ctx, pr, dst, func(w string) { fmt.Fprintln(stderr, "kiln cp:", w) })
		pr.CloseWithError(errors.New("copy ended"))
		if cerr := <-copied; cerr != nil {
			return fmt.Errorf("cp %s: %w", src, cerr) // the microVM's reason is the better one
		}
		return err
	}
	if !path.IsAbs(dpath) {
		return fmt.Errorf("cp: %q: give an absolute path in the microVM", dst)
	}
	if src != "-" {
		if _, err := os.Lstat(src); err != nil {
			return fmt.Errorf("cp: %w", err)
		}
	}
	conn, err := dialShell(ctx, s, did, o, remote.PathCopyIn, nil)
	if err != nil {
		return err
	}
	defer conn.CloseNow()
	return remote.CopyIn(ctx, conn, dpath, func(info remote.CopyInfo, w io.Writer) error {
		if src == "-" {
			if !info.Dir {
				return fmt.Errorf("cp: a tar stream from stdin goes into an existing directory; %s is none", dpath)
			}
			_, err := io.Copy(w, stdin)
			return err
		}
		return tartree.WriteTar(w, src, info.TopName(dpath, filepath.Base(filepath.Clean(src))))
	})
}
