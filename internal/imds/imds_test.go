package imds

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/credentials/ec2rolecreds"
	sdkimds "github.com/aws/aws-sdk-go-v2/feature/ec2/imds"
)

const testRole = "arn:aws:iam::123456789012:role/app/kiln-app"

func newTestServer(t *testing.T, role string, creds aws.CredentialsProvider) *httptest.Server {
	t.Helper()
	h, err := New(Config{RoleARN: role, Credentials: creds})
	if err != nil {
		t.Fatal(err)
	}
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return s
}

// TestSDKCredentials: the AWS SDK's own EC2 role provider (IMDSv2 flow:
// PUT token, GET role, GET credentials) gets the role's credentials, with
// an expiration.
func TestSDKCredentials(t *testing.T) {
	static := credentials.NewStaticCredentialsProvider("AKIDKILN", "secret", "session")
	s := newTestServer(t, testRole, static)
	p := ec2rolecreds.New(func(o *ec2rolecreds.Options) {
		o.Client = sdkimds.New(sdkimds.Options{Endpoint: s.URL, EnableFallback: aws.FalseTernary})
	})
	c, err := p.Retrieve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c.AccessKeyID != "AKIDKILN" || c.SecretAccessKey != "secret" || c.SessionToken != "session" {
		t.Errorf("credentials = %+v", c)
	}
	if !c.CanExpire || time.Until(c.Expires) < 50*time.Minute || time.Until(c.Expires) > 61*time.Minute {
		t.Errorf("expires %v, want about an hour from now", c.Expires)
	}
}

func get(t *testing.T, url string, hdr map[string]string, method string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// TestProtocol walks IMDSv2's rules: v1 (no token) is refused, tokens are
// bound to their handler and their TTL, a VM without a role gets 404 and
// another role's name is 404.
func TestProtocol(t *testing.T) {
	static := credentials.NewStaticCredentialsProvider("AKIDKILN", "secret", "")
	withRole := newTestServer(t, testRole, static)
	noRole := newTestServer(t, "", nil)
	token := func(s *httptest.Server, ttl string) string {
		code, body := get(t, s.URL+TokenPath, map[string]string{TTLHeader: ttl}, http.MethodPut)
		if code != 200 {
			t.Fatalf("PUT token: %d %s", code, body)
		}
		return body
	}
	tok := token(withRole, "21600")
	other := token(noRole, "60")
	auth := map[string]string{TokenHeader: tok}
	for _, tt := range []struct {
		name   string
		srv    *httptest.Server
		method string
		path   string
		hdr    map[string]string
		want   int
		body   string
	}{
		{"v1 get refused", withRole, "GET", CredentialsPath, nil, 401, ""},
		{"v1 credentials refused", withRole, "GET", CredentialsPath + "kiln-app", nil, 401, ""},
		{"role name", withRole, "GET", CredentialsPath, auth, 200, "kiln-app"},
		{"credentials", withRole, "GET", CredentialsPath + "kiln-app", auth, 200, `"AccessKeyId":"AKIDKILN"`},
		{"other role", withRole, "GET", CredentialsPath + "admin", auth, 404, ""},
		{"another vm's token", withRole, "GET", CredentialsPath, map[string]string{TokenHeader: other}, 401, ""},
		{"forged token", withRole, "GET", CredentialsPath, map[string]string{TokenHeader: strings.Repeat("A", len(tok))}, 401, ""},
		{"no role: 404", noRole, "GET", CredentialsPath, map[string]string{TokenHeader: other}, 404, ""},
		{"token without ttl", withRole, "PUT", TokenPath, nil, 400, ""},
		{"token ttl too long", withRole, "PUT", TokenPath, map[string]string{TTLHeader: "21601"}, 400, ""},
		{"token by GET", withRole, "GET", TokenPath, map[string]string{TTLHeader: "60"}, 405, ""},
		{"proxied token request", withRole, "PUT", TokenPath, map[string]string{TTLHeader: "60", "X-Forwarded-For": "1.2.3.4"}, 403, ""},
		{"post refused", withRole, "POST", CredentialsPath, auth, 405, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, body := get(t, tt.srv.URL+tt.path, tt.hdr, tt.method)
			if code != tt.want || !strings.Contains(body, tt.body) {
				t.Errorf("%s %s = %d %q, want %d with %q", tt.method, tt.path, code, body, tt.want, tt.body)
			}
		})
	}
}

// TestTokenExpires: a token is refused once its TTL has passed.
func TestTokenExpires(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	h, err := New(Config{Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	tok := h.sign(now.Add(10 * time.Second))
	if !h.validToken(tok) {
		t.Fatal("fresh token refused")
	}
	now = now.Add(11 * time.Second)
	if h.validToken(tok) {
		t.Fatal("expired token accepted")
	}
}

func TestRoleName(t *testing.T) {
	for arn, want := range map[string]string{
		"arn:aws:iam::123456789012:role/app":         "app",
		"arn:aws:iam::123456789012:role/path/to/app": "app",
		"arn:aws:iam::123456789012:user/app":         "",
		"role/app":                                   "",
		"arn:aws:iam::123456789012:role/":            "",
	} {
		got, err := RoleName(arn)
		if got != want || (err != nil) != (want == "") {
			t.Errorf("RoleName(%q) = %q, %v; want %q", arn, got, err, want)
		}
	}
}

func FuzzToken(f *testing.F) {
	h, err := New(Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(h.sign(time.Now().Add(time.Minute)), "60")
	f.Add("", "")
	f.Add(strings.Repeat("A", 54), "21600")
	f.Add("!!!", "-1")
	f.Fuzz(func(t *testing.T, tok, ttl string) {
		if _, ok := h.parseToken(tok); ok && tok != h.sign(mustExp(h, tok)) {
			t.Fatalf("token %q accepted but not ours", tok)
		}
		if n, err := ParseTTL(ttl); err == nil && (n < 1 || n > MaxTTL) {
			t.Fatalf("ParseTTL(%q) = %d", ttl, n)
		}
	})
}

func mustExp(h *Handler, tok string) time.Time {
	exp, _ := h.parseToken(tok)
	return exp
}
