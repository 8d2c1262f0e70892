package proxy

import (
	"bufio"
	"io"
	"net/http"
	"strings"
	"testing"
)

// FuzzCookieToken: the token cookieToken reads from Cookie fields (the
// input's lines, one field each) is the one net/http's r.Cookie reads,
// from the fields as the h1 loop keeps them and as the h2 loop joins
// them; and writeCookieField writes the guest the Cookie field
// stripAuthCookie leaves, from either shape.
func FuzzCookieToken(f *testing.F) {
	for _, s := range []string{
		CookieAuth + "=tok",
		"a=1; " + CookieAuth + "=tok;b=2 ;  ; c",
		"  " + CookieAuth + " =tok ",
		CookieAuth + "= tok",
		CookieAuth + "=\"tok\"; a=\"1\"",
		CookieAuth + "=\"tok",
		CookieAuth + "=\"\"",
		CookieAuth + "=; " + CookieAuth + "=tok",
		CookieAuth + "; " + CookieAuth + "=tok",
		CookieAuth + "=a\\b; " + CookieAuth + "=a\"b; " + CookieAuth + "=\x80; " + CookieAuth + "=tok",
		"a=1\n" + CookieAuth + "=tok\nb=2",
		CookieAuth + "=x\x7f\n" + CookieAuth + "=tok",
		"\n\n; ;\n" + CookieAuth + "\t=\ttok\t",
		strings.ToUpper(CookieAuth) + "=tok; " + CookieAuth + "x=1",
		strings.Repeat("a=1;", maxDirectCookies-2) + "\n" + CookieAuth + "=tok",
		strings.Repeat("a=1;", maxDirectCookies-1) + "\n" + CookieAuth + "=tok",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, block string) {
		vals := strings.Split(block, "\n")
		fs := []hfield{{"Accept", "*/*"}}
		for _, v := range vals {
			fs = append(fs, hfield{"Cookie", v}, hfield{"X-Other", CookieAuth + "=other"})
		}
		tok, ok := cookieToken(fs)
		n := 0
		for _, v := range vals {
			n += strings.Count(v, ";") + 1
		}
		if ok != (n <= maxDirectCookies) {
			t.Fatalf("%q: %d cookies, ok %v", block, n, ok)
		}
		for _, h := range []http.Header{{"Cookie": vals}, {"Cookie": {strings.Join(vals, "; ")}}} {
			want := ""
			if c, err := (&http.Request{Header: h}).Cookie(CookieAuth); err == nil {
				want = c.Value
			}
			if ok && tok != want {
				t.Fatalf("%q: cookieToken %q, net/http %q (of %q)", block, tok, want, h["Cookie"])
			}
			stripAuthCookie(h)
			want = ""
			if v := h.Get("Cookie"); v != "" {
				want = "Cookie: " + v + "\r\n"
			}
			var got strings.Builder
			bw := bufio.NewWriter(&got)
			writeCookieField(bw, fs)
			bw.Flush()
			if got.String() != want {
				t.Fatalf("%q: the direct path writes %q, the general one %q", block, got.String(), want)
			}
		}
	})
}

// TestCookieTokenAllocs: reading a browser's token and writing the
// guest's Cookie field allocate nothing (the direct path is for that).
func TestCookieTokenAllocs(t *testing.T) {
	fs := []hfield{{"Cookie", "a=1; " + CookieAuth + "=\"tok\"; b=2"}, {"Cookie", "c=3"}}
	bw := bufio.NewWriterSize(io.Discard, 4096)
	n := testing.AllocsPerRun(100, func() {
		if tok, ok := cookieToken(fs); tok != "tok" || !ok {
			t.Fatalf("cookieToken %q %v", tok, ok)
		}
		writeCookieField(bw, fs)
	})
	if n != 0 {
		t.Errorf("%v allocations a request", n)
	}
}
