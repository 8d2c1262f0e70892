package awscli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/kiln-sandbox/kiln/internal/auth"
)

// Settings are the connection flags every operation command has.
type Settings struct {
	EndpointURL     string
	Region          string
	Profile         string
	CredentialsFile string
	Output          string // json, table or text
}

// Kebab turns a wire name into its flag name: imageIdentifier →
// image-identifier, Resource → resource.
func Kebab(s string) string {
	var b strings.Builder
	for i, r := range s {
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte('-')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}

// ParseJSONArg reads a JSON flag value: JSON text, file://PATH, or the
// shorthand k=v,k2=v2 (numbers and booleans typed) for flat structures.
func ParseJSONArg(v string) (any, error) {
	if rest, ok := strings.CutPrefix(v, "file://"); ok {
		b, err := os.ReadFile(rest)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", rest, err)
		}
		v = string(b)
	}
	t := strings.TrimSpace(v)
	if strings.HasPrefix(t, "{") || strings.HasPrefix(t, "[") {
		var out any
		if err := json.Unmarshal([]byte(t), &out); err != nil {
			return nil, fmt.Errorf("invalid JSON: %w", err)
		}
		return out, nil
	}
	m := map[string]any{}
	for _, kv := range strings.Split(t, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("expected JSON or key=value pairs, got %q", kv)
		}
		k = strings.TrimSpace(k)
		val = strings.TrimSpace(val)
		switch {
		case val == "true" || val == "false":
			m[k] = val == "true"
		default:
			if n, err := strconv.ParseInt(val, 10, 64); err == nil {
				m[k] = n
			} else {
				m[k] = val
			}
		}
	}
	return m, nil
}

// Request turns an operation's input (wire names to values) into the
// pieces of an HTTP request.
func Request(op Operation, in map[string]any) (path string, q url.Values, body []byte, err error) {
	path = op.Path
	q = url.Values{}
	b := map[string]any{}
	for _, p := range op.Params {
		v, ok := in[p.Name]
		if !ok || v == nil {
			if p.Required {
				return "", nil, nil, fmt.Errorf("--%s is required", Kebab(p.Name))
			}
			continue
		}
		switch p.Loc {
		case Path:
			s := fmt.Sprint(v)
			if s == "" {
				return "", nil, nil, fmt.Errorf("--%s must not be empty", Kebab(p.Name))
			}
			path = strings.Replace(path, "{"+p.Name+"}", url.PathEscape(s), 1)
		case Query:
			switch x := v.(type) {
			case []string:
				q[p.Name] = x
			case []any:
				for _, e := range x {
					q.Add(p.Name, fmt.Sprint(e))
				}
			default:
				q.Set(p.Name, fmt.Sprint(v))
			}
		case Body:
			b[p.Name] = v
		}
	}
	if len(b) > 0 {
		if body, err = json.Marshal(b); err != nil {
			return "", nil, nil, fmt.Errorf("encoding request: %w", err)
		}
	}
	return path, q, body, nil
}

// Connect makes a client from settings: credentials from
// AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, else the shared-credentials file.
func Connect(s Settings) (*Client, error) {
	var creds auth.Credentials
	if id, sec := os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"); id != "" && sec != "" {
		creds = auth.Credentials{AccessKeyID: id, SecretAccessKey: sec, SessionToken: os.Getenv("AWS_SESSION_TOKEN")}
	} else {
		var err error
		if creds, err = auth.ReadCredentials(s.CredentialsFile, s.Profile); err != nil {
			return nil, err
		}
	}
	return NewClient(s.EndpointURL, s.Region, creds), nil
}

// DefaultCredentialsFile is AWS_SHARED_CREDENTIALS_FILE, else
// DATA_DIR/credentials if it exists, else ~/.aws/credentials.
func DefaultCredentialsFile(dataDir string) string {
	if f := os.Getenv("AWS_SHARED_CREDENTIALS_FILE"); f != "" {
		return f
	}
	if f := filepath.Join(dataDir, "credentials"); fileExists(f) {
		return f
	}
	home, _ := os.UserHomeDir()
	return filepath.Join(home, ".aws", "credentials")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func env(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// AddSettingsFlags adds the connection flags to cmd.
func AddSettingsFlags(cmd *cobra.Command, s *Settings) {
	f := cmd.Flags()
	f.StringVar(&s.EndpointURL, "endpoint-url", env("AWS_ENDPOINT_URL", "http://127.0.0.1:9090"), "API endpoint")
	f.StringVar(&s.Region, "region", env("AWS_REGION", env("AWS_DEFAULT_REGION", "us-east-1")), "region to sign for")
	f.StringVar(&s.Profile, "profile", env("AWS_PROFILE", "default"), "profile in the credentials file")
	f.StringVar(&s.CredentialsFile, "credentials-file", "", "AWS shared-credentials file (default $AWS_SHARED_CREDENTIALS_FILE, DATA_DIR/credentials, ~/.aws/credentials)")
	f.StringVar(&s.Output, "output", env("AWS_DEFAULT_OUTPUT", "json"), "output format: json, table or text")
}

// Command returns the cobra command of op. dataDir gives the default
// credentials file.
func Command(op Operation, dataDir func() string) *cobra.Command {
	var s Settings
	var inputJSON string
	var skeleton, noPaginate bool
	var code string
	var wait bool
	var waitTimeout time.Duration
	strs := map[string]*string{}
	ints := map[string]*int64{}
	lists := map[string]*[]string{}
	cmd := &cobra.Command{
		Use:   op.Command,
		Short: op.Help,
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if skeleton {
				return Print(cmd.OutOrStdout(), Skeleton(op), "json")
			}
			in := map[string]any{}
			if inputJSON != "" {
				v, err := ParseJSONArg(inputJSON)
				if err != nil {
					return fmt.Errorf("--cli-input-json: %w", err)
				}
				m, ok := v.(map[string]any)
				if !ok {
					return fmt.Errorf("--cli-input-json must be a JSON object")
				}
				in = m
			}
			for _, p := range op.Params {
				fl := cmd.Flags().Lookup(Kebab(p.Name))
				if !fl.Changed {
					continue
				}
				switch p.Kind {
				case String:
					in[p.Name] = *strs[p.Name]
				case Int:
					in[p.Name] = *ints[p.Name]
				case StringList:
					in[p.Name] = *lists[p.Name]
				case JSON:
					v, err := ParseJSONArg(*strs[p.Name])
					if err != nil {
						return fmt.Errorf("--%s: %w", Kebab(p.Name), err)
					}
					in[p.Name] = v
				}
			}
			if s.CredentialsFile == "" {
				s.CredentialsFile = DefaultCredentialsFile(dataDir())
			}
			c, err := Connect(s)
			if err != nil {
				return err
			}
			if code != "" {
				if _, ok := in["codeArtifact"]; ok {
					return fmt.Errorf("give --code or --code-artifact, not both")
				}
				uri, err := UploadCode(cmd.Context(), c, code)
				if err != nil {
					return err
				}
				in["codeArtifact"] = map[string]any{"uri": uri}
			}
			var out map[string]any
			if paginated(op) && !noPaginate && in["nextToken"] == nil && in["maxResults"] == nil {
				out, err = CallAll(cmd.Context(), c, op, in)
			} else {
				out, err = Call(cmd.Context(), c, op, in)
			}
			if err != nil {
				return err
			}
			if wait && op.Wait != "" {
				ctx, cancel := context.WithTimeout(cmd.Context(), waitTimeout)
				defer cancel()
				if out, err = Wait(ctx, c, op, in, out, cmd.ErrOrStderr()); err != nil {
					return err
				}
			}
			return Print(cmd.OutOrStdout(), out, s.Output)
		},
	}
	f := cmd.Flags()
	for _, p := range op.Params {
		name := Kebab(p.Name)
		help := p.Help
		if p.Required {
			help += " (required)"
		}
		switch p.Kind {
		case String, JSON:
			strs[p.Name] = f.String(name, "", help)
		case Int:
			ints[p.Name] = f.Int64(name, 0, help)
		case StringList:
			lists[p.Name] = f.StringSlice(name, nil, help+" (repeat or comma-separate)")
		}
	}
	f.StringVar(&inputJSON, "cli-input-json", "", "the input as a JSON object of API member names (or file://PATH); flags override it")
	for _, p := range op.Params {
		if p.Name == "codeArtifact" {
			f.StringVar(&code, "code", "", "local folder (zipped) or .zip to upload as the code artifact (kiln extension)")
		}
	}
	f.BoolVar(&skeleton, "generate-cli-skeleton", false, "print a JSON skeleton of the input for --cli-input-json and exit")
	if paginated(op) {
		f.BoolVar(&noPaginate, "no-paginate", false, "return only the first page (by default all pages are fetched and merged)")
	}
	if op.Wait != "" {
		f.BoolVar(&wait, "wait", false, "wait until the resource reaches a final state (shows build progress)")
		f.DurationVar(&waitTimeout, "wait-timeout", 30*time.Minute, "give up waiting after this long")
	}
	AddSettingsFlags(cmd, &s)
	return cmd
}

func paginated(op Operation) bool {
	for _, p := range op.Params {
		if p.Name == "nextToken" {
			return true
		}
	}
	return false
}

// Skeleton is an input template of op for --cli-input-json.
func Skeleton(op Operation) map[string]any {
	out := map[string]any{}
	for _, p := range op.Params {
		switch p.Kind {
		case Int:
			out[p.Name] = 0
		case StringList:
			out[p.Name] = []string{""}
		case JSON:
			out[p.Name] = map[string]any{}
		default:
			out[p.Name] = ""
		}
	}
	return out
}

// CallAll runs a List operation page after page, as the AWS CLI does by
// default, and returns every item in one answer.
func CallAll(ctx context.Context, c *Client, op Operation, in map[string]any) (map[string]any, error) {
	var items []any
	q := map[string]any{}
	for k, v := range in {
		q[k] = v
	}
	for {
		out, err := Call(ctx, c, op, q)
		if err != nil {
			return nil, err
		}
		page, _ := out["items"].([]any)
		items = append(items, page...)
		next, _ := out["nextToken"].(string)
		if next == "" {
			if items == nil {
				items = []any{}
			}
			return map[string]any{"items": items}, nil
		}
		q["nextToken"] = next
	}
}

// Call runs op with input in and returns the decoded answer ({} for none).
func Call(ctx context.Context, c *Client, op Operation, in map[string]any) (map[string]any, error) {
	path, q, body, err := Request(op, in)
	if err != nil {
		return nil, err
	}
	data, err := c.Do(ctx, op.Method, path, q, body)
	if err != nil {
		return nil, err
	}
	out := map[string]any{}
	if len(bytes.TrimSpace(data)) > 0 {
		dec := json.NewDecoder(bytes.NewReader(data))
		dec.UseNumber()
		if err := dec.Decode(&out); err != nil {
			return nil, fmt.Errorf("decoding answer: %w", err)
		}
	}
	return out, nil
}

// Find returns the operation named name (e.g. "GetMicrovm").
func Find(name string) Operation {
	for _, op := range Operations {
		if op.Name == name {
			return op
		}
	}
	panic("unknown operation " + name)
}

// Wait polls the resource op acted on until it reaches a final state,
// printing build logs to progress as they grow, and returns its last
// description.
func Wait(ctx context.Context, c *Client, op Operation, in, out map[string]any, progress io.Writer) (map[string]any, error) {
	switch op.Wait {
	case "microvm":
		id, _ := out["microvmId"].(string)
		if id == "" {
			id = fmt.Sprint(in["microvmIdentifier"])
		}
		want := map[string][]string{
			"RunMicrovm":       {"RUNNING", "TERMINATED"},
			"SuspendMicrovm":   {"SUSPENDED", "TERMINATED"},
			"ResumeMicrovm":    {"RUNNING", "TERMINATED"},
			"TerminateMicrovm": {"TERMINATED"},
		}[op.Name]
		for {
			m, err := Call(ctx, c, Find("GetMicrovm"), map[string]any{"microvmIdentifier": id})
			if err != nil {
				return nil, err
			}
			st, _ := m["state"].(string)
			for _, w := range want {
				if st == w {
					return m, nil
				}
			}
			if err := sleep(ctx, 250*time.Millisecond); err != nil {
				return nil, fmt.Errorf("waiting for microvm %s (state %s): %w", id, st, err)
			}
		}
	case "image":
		name, _ := out["name"].(string)
		version, _ := out["imageVersion"].(string)
		offsets := map[string]int64{}
		for {
			if version != "" {
				FollowBuildLogs(ctx, c, name, version, offsets, progress)
			}
			m, err := Call(ctx, c, Find("GetMicrovmImage"), map[string]any{"imageIdentifier": name})
			if err != nil {
				return nil, err
			}
			st, _ := m["state"].(string)
			if st != "CREATING" && st != "UPDATING" {
				if version != "" {
					FollowBuildLogs(ctx, c, name, version, offsets, progress)
				}
				return m, nil
			}
			if err := sleep(ctx, 500*time.Millisecond); err != nil {
				return nil, fmt.Errorf("waiting for image %s (state %s): %w", name, st, err)
			}
		}
	}
	return out, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// FollowBuildLogs prints what each build of a version logged since
// offsets[buildId] and advances the offsets. Errors end the round quietly:
// logs are a convenience while waiting.
func FollowBuildLogs(ctx context.Context, c *Client, image, version string, offsets map[string]int64, w io.Writer) (done bool) {
	bs, err := Call(ctx, c, Find("ListMicrovmImageBuilds"), map[string]any{"imageIdentifier": image, "imageVersion": version})
	if err != nil {
		return false
	}
	items, _ := bs["items"].([]any)
	done = len(items) > 0
	for _, it := range items {
		b, _ := it.(map[string]any)
		id, _ := b["buildId"].(string)
		if st, _ := b["buildState"].(string); st == "PENDING" || st == "IN_PROGRESS" {
			done = false
		}
		for {
			q := url.Values{"offset": {strconv.FormatInt(offsets[id], 10)}}
			data, err := c.Do(ctx, "GET", "/kiln/v1/microvm-images/"+url.PathEscape(image)+"/versions/"+url.PathEscape(version)+"/builds/"+id+"/log", q, nil)
			if err != nil {
				break
			}
			var l struct {
				Log        string `json:"log"`
				NextOffset int64  `json:"nextOffset"`
			}
			if json.Unmarshal(data, &l) != nil || l.Log == "" {
				break
			}
			io.WriteString(w, l.Log)
			offsets[id] = l.NextOffset
		}
	}
	return done
}

var timeFields = map[string]bool{"createdAt": true, "updatedAt": true, "startedAt": true, "terminatedAt": true}

// humanize turns epoch-second timestamps into RFC 3339, as the AWS CLI
// shows them.
func humanize(v any, key string) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = humanize(e, k)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = humanize(e, "")
		}
		return out
	case json.Number:
		if timeFields[key] {
			if f, err := x.Float64(); err == nil {
				return time.UnixMilli(int64(f * 1000)).UTC().Format("2006-01-02T15:04:05.000Z07:00")
			}
		}
	}
	return v
}

// Print writes an answer in format json (indented), table or text.
func Print(w io.Writer, out map[string]any, format string) error {
	v := humanize(out, "").(map[string]any)
	switch format {
	case "json", "":
		if len(v) == 0 {
			return nil
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "    ")
		enc.SetEscapeHTML(false)
		return enc.Encode(v)
	case "table", "text":
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		printTable(tw, v, format == "table")
		return tw.Flush()
	default:
		return fmt.Errorf("unknown --output %q (json, table or text)", format)
	}
}

func scalar(v any) string {
	switch x := v.(type) {
	case nil:
		return ""
	case string:
		return x
	case map[string]any, []any:
		b, _ := json.Marshal(x)
		return string(b)
	default:
		return fmt.Sprint(x)
	}
}

func keys(m map[string]any) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func printTable(w io.Writer, v map[string]any, headers bool) {
	if items, ok := v["items"].([]any); ok {
		cols := map[string]bool{}
		for _, it := range items {
			if m, ok := it.(map[string]any); ok {
				for k := range m {
					cols[k] = true
				}
			}
		}
		var names []string
		for k := range cols {
			names = append(names, k)
		}
		sort.Strings(names)
		if headers {
			fmt.Fprintln(w, strings.Join(names, "\t"))
		}
		for _, it := range items {
			m, _ := it.(map[string]any)
			row := make([]string, len(names))
			for i, n := range names {
				row[i] = scalar(m[n])
			}
			fmt.Fprintln(w, strings.Join(row, "\t"))
		}
		if nt, ok := v["nextToken"].(string); ok && nt != "" {
			fmt.Fprintf(w, "nextToken\t%s\n", nt)
		}
		return
	}
	for _, k := range keys(v) {
		fmt.Fprintf(w, "%s\t%s\n", k, scalar(v[k]))
	}
}

// IsNotFound reports whether err is a ResourceNotFoundException.
func IsNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Type == "ResourceNotFoundException"
}

// FollowMicrovmLog prints what a microVM logged since *offset and advances
// it; it returns the microVM's state ("" if the log could not be read).
func FollowMicrovmLog(ctx context.Context, c *Client, id string, offset *int64, w io.Writer) (string, error) {
	for {
		q := url.Values{"offset": {strconv.FormatInt(*offset, 10)}}
		data, err := c.Do(ctx, "GET", "/kiln/v1/microvms/"+url.PathEscape(id)+"/log", q, nil)
		if err != nil {
			return "", err
		}
		var l struct {
			State      string `json:"state"`
			Log        string `json:"log"`
			NextOffset int64  `json:"nextOffset"`
		}
		if err := json.Unmarshal(data, &l); err != nil {
			return "", fmt.Errorf("decoding log: %w", err)
		}
		io.WriteString(w, l.Log)
		*offset = l.NextOffset
		if l.Log == "" {
			return l.State, nil
		}
	}
}
