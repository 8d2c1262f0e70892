package e2b

import (
	"context"
	"encoding/json"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// defaultMemoryMiB is what a version without resources builds with
// (imagebuild.DefaultMemoryMiB).
const defaultMemoryMiB = 2048

// epochTime is an AWS API timestamp (seconds, with a fraction) in E2B's
// date-time form.
func epochTime(sec float64) string {
	return time.Unix(0, int64(sec*1e9)).UTC().Format(time.RFC3339Nano)
}

// buildStatusOf is a version's state as E2B's build status.
func buildStatusOf(state string) string {
	switch state {
	case store.VersionSuccessful:
		return "ready"
	case store.VersionFailed:
		return "error"
	}
	return "building"
}

// getTemplate is GET /templates/{templateID}: the template and its builds
// (the image's versions, oldest first), limit (1-100, default 100) at a
// time, the next page's token in X-Next-Token.
func (s *Server) getTemplate(ctx context.Context, q *request) (int, any, error) {
	tid := q.r.PathValue("templateID")
	if !templateNameRE.MatchString(tid) {
		return 0, nil, errorf(404, "template %q not found", tid)
	}
	query := q.r.URL.Query()
	limit := 100
	if l := query.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > 100 {
			return 0, nil, errorf(400, "limit must be an integer between 1 and 100")
		}
		limit = n
	}
	img, found, err := s.imageOf(ctx, q.key, tid)
	if err != nil {
		return 0, nil, err
	}
	if !found {
		return 0, nil, errorf(404, "template %q not found", tid)
	}
	vs, next, err := s.versions(ctx, q.key, tid, limit, query.Get("nextToken"))
	if err != nil {
		return 0, nil, err
	}
	builds := make([]map[string]any, 0, len(vs))
	for _, v := range vs {
		mem := int64(defaultMemoryMiB)
		if len(v.ImageConfig.Resources) > 0 {
			mem = 0
			for _, r := range v.ImageConfig.Resources {
				mem = max(mem, r.MinimumMemoryInMiB)
			}
		}
		bid, err := s.versionBuildID(ctx, q.key.Account, tid, v.ImageVersion)
		if err != nil {
			return 0, nil, err
		}
		b := map[string]any{"buildID": bid, "status": buildStatusOf(v.State),
			"cpuCount": api.VCPUsFor(mem), "memoryMB": mem, "envdVersion": EnvdVersion,
			"createdAt": epochTime(v.CreatedAt), "updatedAt": epochTime(v.UpdatedAt)}
		if v.State == store.VersionSuccessful || v.State == store.VersionFailed {
			b["finishedAt"] = epochTime(v.UpdatedAt)
		}
		builds = append(builds, b)
	}
	if next != "" {
		q.header.Set("X-Next-Token", next)
	}
	created, _ := img.CreatedAt.Float64()
	updated, _ := img.UpdatedAt.Float64()
	return 200, map[string]any{"templateID": tid, "public": false, "names": []string{tid}, "aliases": []string{tid},
		"builds": builds, "createdAt": epochTime(created), "updatedAt": epochTime(updated), "lastSpawnedAt": nil, "spawnCount": 0}, nil
}

// patchTemplate is PATCH /templates/{templateID} (and /v2/): kiln's
// templates are images of one account, so public stays false.
func (s *Server) patchTemplate(ctx context.Context, q *request) (int, any, error) {
	tid := q.r.PathValue("templateID")
	var in struct {
		Public *bool `json:"public"`
	}
	if len(q.body) > 0 {
		if err := json.Unmarshal(q.body, &in); err != nil {
			return 0, nil, errorf(400, "request body is not a valid TemplateUpdateRequest: %v", err)
		}
	}
	if err := s.templateExists(ctx, q.key, tid); err != nil {
		return 0, nil, err
	}
	if in.Public != nil && *in.Public {
		return 0, nil, errorf(400, "template %s cannot be made public: a kiln template is an image of its account, which other accounts cannot run; build it in the other account instead", tid)
	}
	if strings.HasPrefix(q.r.URL.Path, "/v2/") {
		return 200, map[string]any{"names": []string{tid}}, nil
	}
	return 200, nil, nil
}

// logLevels orders E2B's log levels.
var logLevels = map[string]int{"debug": 0, "info": 1, "warn": 2, "error": 3}

// maxLogsLimit is the most entries one logs call returns (E2B's too).
const maxLogsLimit = 100

// buildLogs is GET /templates/{templateID}/builds/{buildID}/logs: the
// build log's lines as E2B log entries. kiln's build log keeps no time per
// line, so entries are stamped when read (as the status route's are) and
// `cursor` (milliseconds) selects by that stamp: forward, entries at or
// after it (from the log's start); backward, the last ones at or before it
// (default now), newest first. `level` is the least level returned;
// `source` is accepted (kiln keeps one log).
func (s *Server) buildLogs(ctx context.Context, q *request) (int, any, error) {
	if err := s.templatesOn(); err != nil {
		return 0, nil, err
	}
	tid, bid := q.r.PathValue("templateID"), q.r.PathValue("buildID")
	lq, err := parseLogsQuery(q.r.URL.Query())
	if err != nil {
		return 0, nil, err
	}
	version, err := s.buildVersion(ctx, q.key, tid, bid)
	if err != nil {
		return 0, nil, err
	}
	now := s.cfg.Now().UTC()
	entries := []logEntry{}
	if lq.forward && now.Before(lq.cursor) || !lq.forward && !lq.cursor.IsZero() && now.After(lq.cursor) {
		return 200, map[string]any{"logs": entries}, nil
	}
	stamp := now.Format(time.RFC3339Nano)
	err = s.eachLogLine(ctx, q.key, tid, version, func(line string) bool {
		lvl := levelOf(line)
		if logLevels[lvl] < lq.level {
			return true
		}
		entries = append(entries, logEntry{Timestamp: stamp, Level: lvl, Message: line})
		if lq.forward {
			return len(entries) < lq.limit
		}
		if len(entries) > lq.limit {
			entries = entries[1:]
		}
		return true
	})
	if err != nil {
		return 0, nil, err
	}
	if !lq.forward {
		for i, j := 0, len(entries)-1; i < j; i, j = i+1, j-1 {
			entries[i], entries[j] = entries[j], entries[i]
		}
	}
	return 200, map[string]any{"logs": entries}, nil
}

type logsQuery struct {
	cursor  time.Time
	forward bool
	level   int
	limit   int
}

// parseLogsQuery reads the logs route's query; a zero cursor is the log's
// start (forward) or now (backward).
func parseLogsQuery(v url.Values) (logsQuery, error) {
	lq := logsQuery{forward: true, limit: maxLogsLimit, level: logLevels["debug"]}
	switch d := v.Get("direction"); d {
	case "", "forward":
	case "backward":
		lq.forward = false
	default:
		return lq, errorf(400, "direction %q: forward or backward", d)
	}
	if c := v.Get("cursor"); c != "" {
		ms, err := strconv.ParseInt(c, 10, 64)
		if err != nil || ms < 0 {
			return lq, errorf(400, "cursor must be a timestamp in milliseconds")
		}
		lq.cursor = time.UnixMilli(ms)
	}
	if l := v.Get("level"); l != "" {
		n, ok := logLevels[l]
		if !ok {
			return lq, errorf(400, "level %q: debug, info, warn or error", l)
		}
		lq.level = n
	}
	if l := v.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 0 || n > maxLogsLimit {
			return lq, errorf(400, "limit must be an integer between 0 and %d", maxLogsLimit)
		}
		lq.limit = n
	}
	if src := v.Get("source"); src != "" && src != "temporary" && src != "persistent" {
		return lq, errorf(400, "source %q: temporary or persistent", src)
	}
	return lq, nil
}
