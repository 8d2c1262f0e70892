package store

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Helpers every implementation shares, so that their tokens, page sizes
// and recorded events are the same whichever database holds them.

// EncodePageToken encodes the position after the record numbered seq.
func EncodePageToken(seq int64) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(seq, 10)))
}

// DecodePageToken decodes a token EncodePageToken made ("": 0, the
// start); errdefs.ErrInvalid if it is not one.
func DecodePageToken(tok string) (int64, error) {
	if tok == "" {
		return 0, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		return 0, fmt.Errorf("nextToken is not valid: %w", errdefs.ErrInvalid)
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("nextToken is not valid: %w", errdefs.ErrInvalid)
	}
	return n, nil
}

// PageLimit is the number of items a page holds: p.Limit within 1..1000.
func PageLimit(p Page) int {
	if p.Limit <= 0 || p.Limit > 1000 {
		return 1000
	}
	return p.Limit
}

// HasState reports whether s is in list.
func HasState(list []MicrovmState, s MicrovmState) bool { return slices.Contains(list, s) }

// MaxEventReason bounds a recorded reason: reasons carry error text.
const MaxEventReason = 1024

// EventToRecord is ev as a store records it: timed now if it carries no
// time, with the default reason of its transition if it has none, and
// its reason cut to MaxEventReason.
func EventToRecord(ev Event) Event {
	if ev.At.IsZero() {
		ev.At = time.Now()
	}
	if ev.Reason == "" {
		ev.Reason = defaultReason(ev.From, ev.State)
	}
	if len(ev.Reason) > MaxEventReason {
		ev.Reason = ev.Reason[:MaxEventReason]
	}
	return ev
}

// defaultReason names a transition whose caller gave no reason.
func defaultReason(from, to string) string {
	switch {
	case from == "":
		return "Created"
	case to == string(StateRunning) && from == string(StatePending):
		return "Started"
	case to == string(StateRunning) && from == string(StateSuspended):
		return "Resumed"
	case to == string(StateRunning) && from == string(StateSuspending):
		return "SuspendCancelled"
	}
	return ""
}

// MicrovmEvent is the event of m moving from a state (from "": created).
func MicrovmEvent(m Microvm, from MicrovmState) Event {
	return Event{Account: m.Account, Kind: EventMicrovm, Resource: m.ID, From: string(from),
		State: string(m.State), Reason: m.StateReason, At: m.UpdatedAt}
}

// CreatedMicrovmEvent is the event CreateMicrovm records.
func CreatedMicrovmEvent(m Microvm) Event {
	ev := MicrovmEvent(m, "")
	if ev.Reason == "" {
		ev.Reason = "RunMicrovm"
	}
	if ev.At.IsZero() {
		ev.At = m.StartedAt
	}
	return ev
}

// VersionEvent is the event of v moving from a state (from "": created).
func VersionEvent(v ImageVersion, from string) Event {
	return Event{Account: v.Account, Kind: EventImageVersion, Resource: v.ImageName, Version: v.Version,
		From: from, State: v.State, Reason: v.StateReason, At: v.UpdatedAt}
}

// UsageSet gathers the usage of accounts in the order they are first
// seen, for UsageTotals.
type UsageSet struct {
	by    map[string]*Usage
	order []string
}

// Of returns the account's usage, added empty if not seen yet.
func (s *UsageSet) Of(account string) *Usage {
	if s.by == nil {
		s.by = map[string]*Usage{}
	}
	u := s.by[account]
	if u == nil {
		u = &Usage{Account: account}
		s.by[account] = u
		s.order = append(s.order, account)
	}
	return u
}

// List returns the usages gathered; an account asked for (account != "")
// is in it even when it used nothing.
func (s *UsageSet) List(account string) []Usage {
	if account != "" {
		s.Of(account)
	}
	out := make([]Usage, 0, len(s.order))
	for _, a := range s.order {
		out = append(out, *s.by[a])
	}
	return out
}
