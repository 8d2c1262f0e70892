package dockerfile

import (
	"fmt"
	"io"
	"strings"

	"github.com/moby/buildkit/frontend/dockerfile/shell"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
)

// Expand returns the step with $VAR and ${VAR...} substituted in the words
// docker build substitutes (COPY/ADD paths and flags, ENV, LABEL, ARG
// defaults, WORKDIR, USER, STOPSIGNAL, EXPOSE, RUN --mount target, source
// and id). env is the stage's environment at this step (base image ENV,
// ENV steps, ARG values). The commands of RUN, CMD and ENTRYPOINT are left
// alone: their shell expands at run time.
func (s Step) Expand(env map[string]string, escape rune) (Step, error) {
	lex := shell.NewLex(escape)
	get := envMap(env)
	word := func(w string) (string, error) {
		out, _, err := lex.ProcessWord(w, get)
		if err != nil {
			return "", fmt.Errorf("line %d: expanding %q: %w", s.Line, w, err)
		}
		return out, nil
	}
	var err error
	each := func(ws []string) []string {
		if ws == nil {
			return nil
		}
		out := make([]string, len(ws))
		for i, w := range ws {
			if err == nil {
				out[i], err = word(w)
			}
		}
		return out
	}
	switch s.Kind {
	case Copy, Add:
		s.Sources = each(s.Sources)
		s.Exclude = each(s.Exclude)
		if err == nil {
			s.Dest, err = word(s.Dest)
		}
		if err == nil {
			s.Chown, err = word(s.Chown)
		}
		if err == nil {
			s.Chmod, err = word(s.Chmod)
		}
	case Env, Label, Arg:
		kvs := make([]KV, len(s.KVs))
		for i, kv := range s.KVs {
			kvs[i] = kv
			if err == nil && kv.HasValue {
				kvs[i].Value, err = word(kv.Value)
			}
		}
		s.KVs = kvs
	case Workdir, User, StopSignal:
		s.Value, err = word(s.Value)
	case Expose:
		s.Ports = each(s.Ports)
	case Run:
		if s.Mounts != nil {
			ms := make([]Mount, len(s.Mounts))
			for i, m := range s.Mounts {
				for _, w := range []*string{&m.Target, &m.Source, &m.ID} {
					if err == nil {
						*w, err = word(*w)
					}
				}
				ms[i] = m
			}
			s.Mounts = ms
		}
	}
	return s, err
}

// Ignore is a parsed .dockerignore.
type Ignore struct {
	pm *patternmatcher.PatternMatcher
}

// ParseIgnore reads a .dockerignore; a nil reader means none.
func ParseIgnore(r io.Reader) (*Ignore, error) {
	if r == nil {
		return &Ignore{}, nil
	}
	patterns, err := ignorefile.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("reading .dockerignore: %w", err)
	}
	pm, err := patternmatcher.New(patterns)
	if err != nil {
		return nil, fmt.Errorf("parsing .dockerignore: %w", err)
	}
	return &Ignore{pm: pm}, nil
}

// Excluded reports whether rel (slash-separated, relative to the build
// context) is ignored. A folder that is excluded but has re-included
// entries (!pattern) is not skipped as a whole.
func (ig *Ignore) Excluded(rel string, isDir bool) bool {
	if ig == nil || ig.pm == nil {
		return false
	}
	m, err := ig.pm.MatchesOrParentMatches(rel)
	if err != nil {
		return false
	}
	if m && isDir && ig.pm.Exclusions() {
		// A later "!dir/keep" may re-include something below: walk in.
		for _, p := range ig.pm.Patterns() {
			if p.Exclusion() && strings.HasPrefix(p.String(), strings.TrimSuffix(rel, "/")+"/") {
				return false
			}
		}
	}
	return m
}
