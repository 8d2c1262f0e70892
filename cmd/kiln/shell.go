//go:build linux

package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/kiln-sandbox/kiln/internal/awscli"
	"github.com/kiln-sandbox/kiln/internal/remote"
)

// `kiln shell MICROVM_ID`: an interactive shell in a microVM run with
// SHELL_INGRESS. It asks the API for a shell token (CreateMicrovmShellAuthToken),
// opens the endpoint's WebSocket on port 8022 (token and port as
// subprotocols, as browser clients must send them), and bridges the local
// terminal: binary frames carry terminal bytes, a text frame
// {"cols":N,"rows":N} resizes, and the close reason "exit N" is the exit
// status. When stdin is not a terminal it just streams, and stdin's end is
// sent as ^D so that the remote shell sees end of input.
func init() {
	var s awscli.Settings
	var o shellOptions
	cmd := &cobra.Command{
		Use:   "shell MICROVM_ID",
		Short: "Open an interactive shell in a microVM (needs the SHELL_INGRESS network connector)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			shellDefaults(&s, &o)
			o.Stdin, o.Stdout = os.Stdin, os.Stdout
			code, err := runShell(cmd.Context(), s, args[0], o)
			if err != nil {
				return err
			}
			if code != 0 {
				os.Exit(code) // the terminal is restored by now
			}
			return nil
		},
	}
	awscli.AddSettingsFlags(cmd, &s)
	addShellFlags(cmd, &o)
	rootCmd.AddCommand(cmd)
}

// addShellFlags adds the flags of the shell socket (kiln shell, exec, cp).
func addShellFlags(cmd *cobra.Command, o *shellOptions) {
	cmd.Flags().StringVar(&o.CAFile, "ca", "", "CA certificate to trust for the endpoint (default DATA_DIR/ca.pem)")
	cmd.Flags().StringVar(&o.ConnectTo, "connect-to", "", "HOST:PORT to connect to instead of the endpoint's own address (names under .localhost go to 127.0.0.1 anyway)")
	cmd.Flags().IntVar(&o.Minutes, "token-minutes", 60, "lifetime of the shell token (1 to 60 minutes)")
}

// shellDefaults fills in the credentials file and CA from the data dir.
func shellDefaults(s *awscli.Settings, o *shellOptions) {
	if s.CredentialsFile == "" {
		s.CredentialsFile = awscli.DefaultCredentialsFile(dataDir)
	}
	if o.CAFile == "" {
		o.CAFile = filepath.Join(dataDir, "ca.pem")
	}
}

type shellOptions struct {
	CAFile    string
	ConnectTo string
	Minutes   int
	Stdin     *os.File
	Stdout    io.Writer
}

// runShell returns the remote shell's exit status.
func runShell(ctx context.Context, s awscli.Settings, id string, o shellOptions) (int, error) {
	fd := int(o.Stdin.Fd())
	tty := isTerminal(fd)
	cols, rows := termSize(fd, tty)
	q := url.Values{"cols": {strconv.Itoa(int(cols))}, "rows": {strconv.Itoa(int(rows))}}
	conn, err := dialShell(ctx, s, id, o, "/", q)
	if err != nil {
		return 0, err
	}
	defer conn.CloseNow()
	conn.SetReadLimit(4 << 20)

	if tty {
		restore, err := makeRaw(fd)
		if err != nil {
			return 0, err
		}
		defer restore()
	}
	return bridgeTerminal(ctx, conn, o.Stdin, o.Stdout, tty, fd)
}

// termSize is the terminal's size, 80x24 when unknown.
func termSize(fd int, tty bool) (cols, rows uint16) {
	cols, rows = 80, 24
	if tty {
		if ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ); err == nil && ws.Col > 0 && ws.Row > 0 {
			cols, rows = ws.Col, ws.Row
		}
	}
	return cols, rows
}

// dialShell opens the microVM's shell WebSocket at path (kiln shell, exec
// and cp share it): a shell token from the API (CreateMicrovmShellAuthToken,
// so the caller needs the rights kiln shell needs and the microVM
// SHELL_INGRESS), then the endpoint's port 8022 with token and port as
// subprotocols.
func dialShell(ctx context.Context, s awscli.Settings, id string, o shellOptions, path string, q url.Values) (*websocket.Conn, error) {
	c, err := awscli.Connect(s)
	if err != nil {
		return nil, err
	}
	m, err := awscli.Call(ctx, c, awscli.Find("GetMicrovm"), map[string]any{"microvmIdentifier": id})
	if err != nil {
		return nil, err
	}
	endpoint, _ := m["endpoint"].(string)
	if endpoint == "" {
		return nil, fmt.Errorf("microvm %s has no endpoint (state %v)", id, m["state"])
	}
	out, err := awscli.Call(ctx, c, awscli.Find("CreateMicrovmShellAuthToken"), map[string]any{"microvmIdentifier": id, "expirationInMinutes": o.Minutes})
	if err != nil {
		return nil, err
	}
	var tok string
	if at, ok := out["authToken"].(map[string]any); ok {
		for k, v := range at {
			if strings.EqualFold(k, "X-aws-proxy-auth") {
				tok, _ = v.(string)
			}
		}
	}
	if tok == "" {
		return nil, fmt.Errorf("the API returned no shell token: %v", out)
	}

	pem, err := os.ReadFile(o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("reading the endpoint CA (--ca): %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", o.CAFile)
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
	}
	dialTo := o.ConnectTo
	if dialTo == "" && (u.Hostname() == "localhost" || strings.HasSuffix(u.Hostname(), ".localhost")) {
		// RFC 6761: names under localhost are loopback (curl and browsers
		// do this too; Go's resolver does not).
		port := u.Port()
		if port == "" {
			port = "443"
		}
		dialTo = net.JoinHostPort("127.0.0.1", port)
	}
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, TLSHandshakeTimeout: 30 * time.Second}
	if dialTo != "" {
		tr.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, dialTo)
		}
	}
	wsURL := "wss://" + u.Host + path
	if len(q) > 0 {
		wsURL += "?" + q.Encode()
	}
	// The connect may wake a suspended microVM: allow for a resume.
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	conn, resp, err := websocket.Dial(dctx, wsURL, &websocket.DialOptions{
		HTTPClient:   &http.Client{Transport: tr},
		Subprotocols: []string{"lambda-microvms.authentication." + tok, "lambda-microvms.port.8022"},
	})
	cancel()
	if err != nil {
		if resp != nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			return nil, fmt.Errorf("connecting to microvm %s: %w: HTTP %d %s", id, err, resp.StatusCode, strings.TrimSpace(string(b)))
		}
		return nil, fmt.Errorf("connecting to microvm %s: %w", id, err)
	}
	return conn, nil
}

// bridgeTerminal copies until the remote side closes and returns the
// exit status from the close reason.
func bridgeTerminal(ctx context.Context, conn *websocket.Conn, in io.Reader, out io.Writer, tty bool, fd int) (int, error) {
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	if tty {
		sizes := winchSizes(ctx, fd)
		go func() {
			for sz := range sizes {
				b, _ := json.Marshal(remote.Control{Cols: sz[0], Rows: sz[1]})
				wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				conn.Write(wctx, websocket.MessageText, b)
				cancel()
			}
		}()
	}
	// lastOutput is when the remote last wrote (unix nanoseconds).
	var lastOutput atomic.Int64
	lastOutput.Store(time.Now().UnixNano())
	// Stdin: a goroutine that may stay blocked in Read when the remote
	// ends first; the process exits right after.
	go func() {
		buf := make([]byte, 32<<10)
		var last byte = '\n'
		send := func(b []byte) error {
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			return conn.Write(wctx, websocket.MessageBinary, b)
		}
		for {
			n, err := in.Read(buf)
			if n > 0 {
				last = buf[n-1]
				if send(buf[:n]) != nil {
					return
				}
			}
			if err != nil {
				if !tty {
					endOfInput(ctx, send, last, &lastOutput)
				}
				return
			}
		}
	}()
	for {
		typ, b, err := conn.Read(ctx)
		if err != nil {
			return remote.ExitStatus(err)
		}
		if typ == websocket.MessageBinary {
			lastOutput.Store(time.Now().UnixNano())
			if _, err := out.Write(b); err != nil {
				return 0, fmt.Errorf("writing output: %w", err)
			}
		}
	}
}

// endOfInput tells the remote shell that piped input ended: ^D on an
// empty line. Input that arrives before the shell's line editor is up
// sits in the PTY's cooked-mode buffer, where a ^D is lost when the
// editor switches to raw mode; so ^D goes only once the remote has been
// quiet for a moment (the shell waits at its prompt), and again after
// longer silences, a few times at most.
func endOfInput(ctx context.Context, send func([]byte) error, last byte, lastOutput *atomic.Int64) {
	if last != '\n' && last != '\r' {
		if send([]byte{'\n'}) != nil {
			return
		}
	}
	quiet := 300 * time.Millisecond
	for range 5 {
		for {
			idle := time.Since(time.Unix(0, lastOutput.Load()))
			if idle >= quiet {
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(quiet - idle):
			}
		}
		if send([]byte{4}) != nil {
			return
		}
		lastOutput.Store(time.Now().UnixNano())
		quiet = 2 * time.Second
	}
}

// winchSizes delivers the terminal's size after each SIGWINCH until ctx
// ends (then it is closed).
func winchSizes(ctx context.Context, fd int) <-chan [2]uint16 {
	out := make(chan [2]uint16, 1)
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, unix.SIGWINCH)
	go func() {
		defer close(out)
		defer signal.Stop(winch)
		for {
			select {
			case <-ctx.Done():
				return
			case <-winch:
				ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
				if err != nil || ws.Col == 0 || ws.Row == 0 {
					continue
				}
				select {
				case out <- [2]uint16{ws.Col, ws.Row}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out
}

func isTerminal(fd int) bool {
	_, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	return err == nil
}

// makeRaw puts the terminal in raw mode (as cfmakeraw) and returns the
// function that restores it: every key, ^C included, goes to the remote.
func makeRaw(fd int) (func(), error) {
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, fmt.Errorf("reading terminal mode: %w", err)
	}
	t := *old
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &t); err != nil {
		return nil, fmt.Errorf("setting raw mode: %w", err)
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}
