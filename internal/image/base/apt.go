package base

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// AptSource is one "deb" source of the host: a mirror URI with its suites
// and components.
type AptSource struct {
	URI        string
	Suites     []string
	Components []string
}

// HostAptSources reads the host's apt sources: deb822 files in
// etcApt/sources.list.d/*.sources, and the one-line format in
// etcApt/sources.list and sources.list.d/*.list. Only "deb" (binary)
// entries that are not disabled are returned, in file order.
func HostAptSources(etcApt string) ([]AptSource, error) {
	var out []AptSource
	deb822, _ := filepath.Glob(filepath.Join(etcApt, "sources.list.d", "*.sources"))
	sort.Strings(deb822)
	for _, f := range deb822 {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", f, err)
		}
		out = append(out, ParseDeb822(string(b))...)
	}
	lists := []string{filepath.Join(etcApt, "sources.list")}
	more, _ := filepath.Glob(filepath.Join(etcApt, "sources.list.d", "*.list"))
	sort.Strings(more)
	for _, f := range append(lists, more...) {
		b, err := os.ReadFile(f)
		if err != nil {
			if os.IsNotExist(err) {
				continue
			}
			return nil, fmt.Errorf("reading %s: %w", f, err)
		}
		out = append(out, ParseOneLine(string(b))...)
	}
	return out, nil
}

// ParseDeb822 parses deb822-style sources (stanzas separated by blank
// lines; "#" lines are comments; field names are case-insensitive;
// continuation lines start with a space).
func ParseDeb822(text string) []AptSource {
	var out []AptSource
	fields := map[string]string{}
	last := ""
	flush := func() {
		defer func() { fields = map[string]string{}; last = "" }()
		if len(fields) == 0 {
			return
		}
		if strings.EqualFold(strings.TrimSpace(fields["enabled"]), "no") {
			return
		}
		if !hasWord(fields["types"], "deb") {
			return
		}
		for _, uri := range strings.Fields(fields["uris"]) {
			out = append(out, AptSource{URI: uri, Suites: strings.Fields(fields["suites"]), Components: strings.Fields(fields["components"])})
		}
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.TrimSpace(line) == "":
			flush()
		case strings.HasPrefix(line, "#"):
		case (line[0] == ' ' || line[0] == '\t') && last != "":
			fields[last] += " " + strings.TrimSpace(line)
		default:
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			last = strings.ToLower(strings.TrimSpace(k))
			fields[last] = strings.TrimSpace(v)
		}
	}
	flush()
	return out
}

// ParseOneLine parses the classic "deb [options] uri suite components…"
// format.
func ParseOneLine(text string) []AptSource {
	var out []AptSource
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") {
			// Options may span several fields: skip to the closing "]".
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) > 0 {
				f = f[1:]
			}
		}
		if len(f) < 2 {
			continue
		}
		out = append(out, AptSource{URI: f[0], Suites: []string{f[1]}, Components: f[2:]})
	}
	return out
}

func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// MirrorFor returns the URI of the first source serving suite with
// component main.
func MirrorFor(sources []AptSource, suite string) (string, bool) {
	for _, s := range sources {
		for _, su := range s.Suites {
			if su == suite && (len(s.Components) == 0 || hasWord(strings.Join(s.Components, " "), "main")) {
				return s.URI, true
			}
		}
	}
	return "", false
}
