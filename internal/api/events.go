package api

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/inflight"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// Kiln extensions: lifecycle events (recorded by the store with every
// state change) and metered usage.
const (
	// UsagePath answers GET ?account=A&since=T&until=T with
	// {"since", "until", "accounts": [store.Usage...]}.
	UsagePath = "/kiln/v1/usage"
)

type eventOut struct {
	Seq      int64  `json:"seq"`
	Kind     string `json:"kind"`
	Resource string `json:"resource"`
	Version  string `json:"version,omitempty"`
	From     string `json:"from,omitempty"`
	State    string `json:"state"`
	Reason   string `json:"reason,omitempty"`
	At       *epoch `json:"at"`
}

func (s *Server) listEvents(ctx context.Context, c *call, f store.EventFilter, exists func() error) (any, error) {
	p, err := pageOf(c, 1000)
	if err != nil {
		return nil, err
	}
	evs, next, err := s.st.ListEvents(ctx, c.account, f, p)
	if err != nil {
		return nil, err
	}
	// Events outlive their records; with neither, the name is unknown.
	if len(evs) == 0 && p.Token == "" {
		if err := exists(); err != nil {
			return nil, err
		}
	}
	out := make([]eventOut, 0, len(evs))
	for _, ev := range evs {
		out = append(out, eventOut{Seq: ev.Seq, Kind: ev.Kind, Resource: ev.Resource, Version: ev.Version, From: ev.From,
			State: ev.State, Reason: ev.Reason, At: ts(ev.At)})
	}
	return map[string]any{"events": out, "nextToken": next}, nil
}

// getMicrovmEvents lists a microVM's state changes, also after it ended.
func (s *Server) getMicrovmEvents(ctx context.Context, c *call) (any, error) {
	ident := c.path("microvmIdentifier")
	id, err := resolve(c, kindMicrovm, "microvmIdentifier", ident)
	if err != nil {
		return nil, err
	}
	return s.listEvents(ctx, c, store.EventFilter{Kind: store.EventMicrovm, Resource: id}, func() error {
		_, err := s.microvm(ctx, c)
		return err
	})
}

// getImageEvents lists the state changes of an image's versions
// (?imageVersion=V for one).
func (s *Server) getImageEvents(ctx context.Context, c *call) (any, error) {
	ident := c.path("imageIdentifier")
	name, err := resolve(c, kindImage, "imageIdentifier", ident)
	if err != nil {
		return nil, err
	}
	version := c.r.URL.Query().Get("imageVersion")
	if len(version) > 64 {
		return nil, fieldError("imageVersion", nil, "Member must have length less than or equal to 64")
	}
	if version != "" {
		// Events carry the version's stored name ("1.0", or "1" from an
		// older kiln), whichever form was asked; a deleted version's
		// events keep the name as asked.
		if v, err := s.getVersion(ctx, c.account, name, version); err == nil {
			version = v.Version
		}
	}
	return s.listEvents(ctx, c, store.EventFilter{Kind: store.EventImageVersion, Resource: name, Version: version}, func() error {
		_, err := s.image(ctx, c)
		return err
	})
}

var accountRE = regexp.MustCompile(`^\d{12}$`)

// ParseSince reads a point in time: RFC 3339, seconds since the epoch, or
// a duration back from now ("24h", "30m", "7d"). Times before the epoch
// are the epoch (nothing was metered earlier); after 2200 they are refused
// (the store keeps nanoseconds since the epoch in 64 bits).
func ParseSince(v string, now time.Time) (time.Time, error) {
	t, err := parseSince(v, now)
	if err != nil {
		return t, err
	}
	if t.Before(time.Unix(0, 0)) {
		return time.Unix(0, 0), nil
	}
	if t.Year() >= 2200 {
		return time.Time{}, errors.New("time is past the year 2200")
	}
	return t, nil
}

func parseSince(v string, now time.Time) (time.Time, error) {
	if v == "" {
		return time.Time{}, errors.New("empty time")
	}
	if t, err := time.Parse(time.RFC3339, v); err == nil {
		return t, nil
	}
	if n, err := strconv.ParseInt(v, 10, 64); err == nil && n >= 0 && n < 1<<34 {
		return time.Unix(n, 0), nil
	}
	if d, ok := strings.CutSuffix(v, "d"); ok {
		if n, err := strconv.Atoi(d); err == nil && n >= 0 && n <= 100000 {
			return now.Add(-time.Duration(n) * 24 * time.Hour), nil
		}
	}
	if d, err := time.ParseDuration(v); err == nil && d >= 0 {
		return now.Add(-d), nil
	}
	return time.Time{}, errors.New("want RFC 3339 (2026-01-02T15:04:05Z), seconds since the epoch, or a duration back from now (24h, 7d)")
}

// getUsage reports metered usage. A tenant sees its own account; an
// operator account any one (?account=A) or all (no account).
func (s *Server) getUsage(ctx context.Context, c *call) (any, error) {
	q := c.r.URL.Query()
	now := s.cfg.Now()
	since, until := time.Unix(0, 0), now
	var err error
	if v := q.Get("since"); v != "" {
		if since, err = ParseSince(v, now); err != nil {
			return nil, fieldError("since", v, err.Error())
		}
	}
	if v := q.Get("until"); v != "" {
		if until, err = ParseSince(v, now); err != nil {
			return nil, fieldError("until", v, err.Error())
		}
	}
	if since.Before(time.Unix(0, 0)) {
		since = time.Unix(0, 0)
	}
	if !until.After(since) {
		return nil, fieldError("until", nil, "Member must be later than since")
	}
	account := q.Get("account")
	operator := slices.Contains(s.cfg.OperatorAccounts, c.account)
	switch {
	case account != "" && !accountRE.MatchString(account):
		return nil, fieldError("account", account, "Member must be a 12-digit account id")
	case account == "" && !operator:
		account = c.account
	case account != c.account && !operator:
		return nil, &Error{Status: 403, Type: "AccessDeniedException", Message: "only the operator account may read another account's usage; leave out --account for your own"}
	}
	us, err := s.st.UsageTotals(ctx, account, since, until)
	if err != nil {
		return nil, err
	}
	// Artifact bytes come from the uploads: the store's, or the folder this
	// server owns.
	byAccount := map[string]int{}
	for i, u := range us {
		byAccount[u.Account] = i
	}
	if s.cfg.Uploads != nil {
		ups, err := s.cfg.Uploads.ListUploads(ctx, account)
		if err != nil {
			return nil, err
		}
		for _, u := range ups {
			i, ok := byAccount[u.Account]
			if !ok {
				us = append(us, store.Usage{Account: u.Account})
				i = len(us) - 1
				byAccount[u.Account] = i
			}
			us[i].ArtifactBytes += u.SizeBytes
		}
	} else if s.cfg.ArtifactDir != "" {
		accounts := []string{account}
		if account == "" {
			ents, _ := os.ReadDir(s.cfg.ArtifactDir)
			accounts = accounts[:0]
			for _, e := range ents {
				if e.IsDir() && accountRE.MatchString(e.Name()) {
					accounts = append(accounts, e.Name())
				}
			}
		}
		for _, a := range accounts {
			n, err := inflight.StoredBytes(filepath.Join(s.cfg.ArtifactDir, a))
			if err != nil || n == 0 {
				continue
			}
			i, ok := byAccount[a]
			if !ok {
				us = append(us, store.Usage{Account: a})
				i = len(us) - 1
				byAccount[a] = i
			}
			us[i].ArtifactBytes = n
		}
	}
	return map[string]any{"since": ts(since), "until": ts(until), "accounts": us}, nil
}
