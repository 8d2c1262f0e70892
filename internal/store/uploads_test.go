package store

import (
	"strings"
	"testing"
)

// FuzzParseUploadURI: the URI is the tenant's. Whatever it accepts names
// exactly one upload: it is the URI UploadURI makes of what it returned.
func FuzzParseUploadURI(f *testing.F) {
	h := strings.Repeat("ab", 32)
	for _, s := range []string{
		UploadURI("123456789012", h), "kiln-upload://123456789012/" + h, "kiln-upload://../" + h + ".zip",
		"kiln-upload://a/b/" + h + ".zip", "kiln-upload://a/" + strings.ToUpper(h) + ".zip", "kiln-upload://a:1/" + h + ".zip",
		"kiln-upload://a/" + h + ".zip?x=1", "KILN-UPLOAD://a/" + h + ".zip", "file:///x.zip", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, uri string) {
		account, sha, err := ParseUploadURI(uri)
		if err != nil {
			return
		}
		if UploadURI(account, sha) != uri {
			t.Fatalf("%q parsed as %q %q, which name %q", uri, account, sha, UploadURI(account, sha))
		}
		if strings.ContainsAny(account, "/.:?#%@") || len(sha) != 64 {
			t.Fatalf("%q: account %q, hash %q", uri, account, sha)
		}
	})
}

func TestParseUploadURI(t *testing.T) {
	h := strings.Repeat("0f", 32)
	a, s, err := ParseUploadURI("kiln-upload://123456789012/" + h + ".zip")
	if err != nil || a != "123456789012" || s != h {
		t.Fatalf("= %q %q %v", a, s, err)
	}
	for _, bad := range []string{"kiln-upload://123456789012/" + h, "kiln-upload:///" + h + ".zip", "kiln-upload://a/" + h + ".zip/", "s3://a/" + h + ".zip"} {
		if _, _, err := ParseUploadURI(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
