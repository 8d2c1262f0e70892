package proxy

import (
	"bufio"
	"net/http"
	"net/textproto"
	"strings"
	"sync"
)

// A browser carries the endpoint token only in the CookieAuth cookie
// (tokenToCookie set it). For the direct path to take its requests, it
// must pick from the Cookie fields exactly the token the general path
// picks (requestPortAndToken: r.Cookie), and send the guest exactly the
// Cookie field the general path sends (stripAuthCookie).

// maxDirectCookies: a request with more cookies than this, in all its
// Cookie fields, takes the general path, so that the direct path never
// has to know net/http's cookie limit (GODEBUG httpcookiemaxnum, 3000 by
// default), beyond which r.Cookie finds none.
const maxDirectCookies = 256

// cookieLimitOK: net/http reads maxDirectCookies cookies (a GODEBUG
// httpcookiemaxnum below that makes every cookie token the general
// path's).
var cookieLimitOK = sync.OnceValue(func() bool {
	r := http.Request{Header: http.Header{"Cookie": {strings.Repeat("a=1;", maxDirectCookies-1) + CookieAuth + "=x"}}}
	_, err := r.Cookie(CookieAuth)
	return err == nil
})

// cookieToken is the token r.Cookie(CookieAuth) reads from the Cookie
// fields among fs, "" for none: the value of the first valid token
// cookie across the fields in order, as net/http's readCookies finds it
// (each ';'-part and the name before its '=' trimmed of ASCII space,
// one pair of double quotes taken off the value, a value with a byte
// that is no cookie-octet skipped). An h2 block's several cookie fields
// (RFC 9113 8.2.3) are read alike: newRequest joins them with "; ", which
// makes the same parts. ok false: too many cookies to tell
// (maxDirectCookies); FuzzCookieToken holds the rest to net/http.
func cookieToken(fs []hfield) (tok string, ok bool) {
	n, found := 0, false
	for _, f := range fs {
		if f.k != "Cookie" {
			continue
		}
		n += strings.Count(f.v, ";") + 1
		for line := f.v; !found && line != ""; {
			var part string
			part, line, _ = strings.Cut(line, ";")
			name, val, _ := strings.Cut(textproto.TrimString(part), "=")
			if textproto.TrimString(name) != CookieAuth {
				continue
			}
			if len(val) > 1 && val[0] == '"' && val[len(val)-1] == '"' {
				val = val[1 : len(val)-1]
			}
			if cookieOctets(val) {
				tok, found = val, true
			}
		}
	}
	return tok, n <= maxDirectCookies && cookieLimitOK()
}

// cookieOctets: v has only the bytes net/http takes in a cookie value.
func cookieOctets(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c >= 0x7f || c == '"' || c == ';' || c == '\\' {
			return false
		}
	}
	return true
}

// writeCookieField writes the Cookie fields among fs as the general path
// sends them on (stripAuthCookie): one field of all their cookies but
// the token's, joined by "; ", or none if no cookie is left.
func writeCookieField(bw *bufio.Writer, fs []hfield) {
	const start = "Cookie: "
	sep := start
	for _, f := range fs {
		if f.k != "Cookie" {
			continue
		}
		for p := range cookiesWithoutAuth(f.v) {
			bw.WriteString(sep)
			bw.WriteString(p)
			sep = "; "
		}
	}
	if sep != start {
		bw.WriteString("\r\n")
	}
}
