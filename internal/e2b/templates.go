package e2b

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// E2B templates are kiln images. The SDK's builder (Template()...,
// Template.build) asks for a build (POST /v3/templates), uploads the files
// of its COPY steps by hash, and triggers the build with its steps
// (POST /v2/templates/{id}/builds/{build}); kiln maps the steps onto a
// Dockerfile, packs it with the uploaded files into a code package and
// runs CreateMicrovmImage (or UpdateMicrovmImage, for a template that
// exists) in-process: the same build VMs, step cache, quotas and
// snapshot as any image. A template's id and name are the image's name;
// its builds are the image's versions, whose state and log the status
// route reports as E2B does.

// templateNameRE is a kiln image name (api's imageNameRE).
var templateNameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$`)

// buildIDRE is the shape of kiln's template build ids (UUIDs, as E2B's).
var buildIDRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// templateState is what the template routes keep in memory.
type templateState struct {
	mu sync.Mutex
	// logs caches where a build's log stood at the last status call, so
	// polling with logsOffset reads only what is new.
	logs map[string]logCursor
	// triggering holds the builds (ACCOUNT/ID) this replica is starting
	// (the store refuses a second start through another).
	triggering map[string]bool
}

// maxLogCursors bounds the log cursor cache; past it, it starts afresh
// (a status call then reads its log from the start once).
const maxLogCursors = 1024

type logCursor struct {
	entries int   // log entries (lines) served before byteOff
	byteOff int64 // offset in the build log
	partial string
}

func (s *Server) templateRoutes() {
	s.tpl.logs = map[string]logCursor{}
	s.tpl.triggering = map[string]bool{}
	s.route("POST /v3/templates", s.requestBuild)
	s.route("POST /v2/templates", s.requestBuild)
	s.route("GET /templates/{templateID}/files/{hash}", s.fileUploadLink)
	s.route("POST /v2/templates/{templateID}/builds/{buildID}", s.triggerBuild)
	s.route("GET /templates/{templateID}/builds/{buildID}/status", s.buildStatus)
	// One pattern for /templates/aliases/{alias} and /templates/{id}/tags:
	// as two, ServeMux would refuse them as overlapping.
	s.route("GET /templates/{a}/{b}", func(ctx context.Context, q *request) (int, any, error) {
		if q.r.PathValue("a") == "aliases" {
			return s.templateAlias(ctx, q)
		}
		if q.r.PathValue("b") == "tags" {
			return s.templateTags(ctx, q)
		}
		return 0, nil, errorf(404, "no E2B route GET %s", q.r.URL.Path)
	})
	s.route("GET /templates", s.listTemplates)
	s.route("GET /v2/templates", s.listTemplates)
	s.route("DELETE /templates/{templateID}", s.deleteTemplate)
	s.route("POST /templates/tags", s.assignTags)
	s.route("DELETE /templates/tags", s.removeTags)
	s.route("GET /templates/{templateID}", s.getTemplate)
	s.route("PATCH /templates/{templateID}", s.patchTemplate)
	s.route("PATCH /v2/templates/{templateID}", s.patchTemplate)
	s.route("GET /templates/{templateID}/builds/{buildID}/logs", s.buildLogs)
	s.mux.HandleFunc("PUT "+uploadPrefix+"{token}", s.uploadFiles)
}

func (s *Server) templatesOn() error {
	if s.cfg.TemplatesDir == "" {
		return errorf(501, "this kiln server builds no E2B templates (no templates folder configured); build the image with the AWS API (kiln create-microvm-image)")
	}
	return nil
}

func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// loadBuild reads the account's build of templateID; any other account's
// or template's is not found.
func (s *Server) loadBuild(ctx context.Context, account, templateID, id string) (store.E2BBuild, error) {
	if !buildIDRE.MatchString(id) {
		return store.E2BBuild{}, errorf(404, "template build %q not found", id)
	}
	b, err := s.cfg.Sandboxes.GetE2BBuild(ctx, account, id)
	if errors.Is(err, errdefs.ErrNotFound) {
		return b, errorf(404, "template build %s not found", id)
	}
	if err != nil {
		return b, err
	}
	if b.Template != templateID {
		return b, errorf(404, "template build %s not found in template %s", id, templateID)
	}
	return b, nil
}

// buildRequest is E2B's TemplateBuildRequestV3 (and V2's alias form).
type buildRequest struct {
	Name          string   `json:"name"`
	Alias         string   `json:"alias"`
	Tags          []string `json:"tags"`
	CPUCount      *int64   `json:"cpuCount"`
	MemoryMB      *int64   `json:"memoryMB"`
	MinFreeDiskMb *int64   `json:"minFreeDiskMb"`
	TeamID        string   `json:"teamID"`
}

var tagRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$`)

// parseBuildRequest decodes and checks a build request.
func parseBuildRequest(body []byte) (buildRequest, error) {
	var in buildRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &in); err != nil {
			return in, errorf(400, "request body is not a valid TemplateBuildRequestV3: %v", err)
		}
	}
	if in.Name == "" {
		in.Name = in.Alias
	}
	if name, tag, ok := strings.Cut(in.Name, ":"); ok {
		in.Name = name
		in.Tags = append(in.Tags, tag)
	}
	if !templateNameRE.MatchString(in.Name) {
		return in, errorf(400, "template name %q: give a name of 1-128 letters, digits, _ . - (it becomes the kiln image's name), optionally with :tag", in.Name)
	}
	if len(in.Tags) > 16 {
		return in, errorf(400, "at most 16 tags")
	}
	for _, t := range in.Tags {
		if !tagRE.MatchString(t) {
			return in, errorf(400, "tag %q: tags are 1-64 letters, digits, _ . -", t)
		}
	}
	if in.CPUCount != nil && (*in.CPUCount < 1 || *in.CPUCount > 8) {
		return in, errorf(400, "cpuCount must be between 1 and 8")
	}
	if in.MemoryMB != nil && (*in.MemoryMB < 1 || *in.MemoryMB > api.MemorySizesMiB[len(api.MemorySizesMiB)-1]) {
		return in, errorf(400, "memoryMB must be between 1 and %d (kiln's sizes: %v MiB)", api.MemorySizesMiB[len(api.MemorySizesMiB)-1], api.MemorySizesMiB)
	}
	return in, nil
}

// requestBuild is POST /v3/templates: a new build of a (new or existing)
// template. Nothing is built until the trigger.
func (s *Server) requestBuild(ctx context.Context, q *request) (int, any, error) {
	if err := s.templatesOn(); err != nil {
		return 0, nil, err
	}
	in, err := parseBuildRequest(q.body)
	if err != nil {
		return 0, nil, err
	}
	b := store.E2BBuild{ID: newUUID(), Account: q.key.Account, Template: in.Name, Tags: in.Tags, CreatedAt: s.cfg.Now().UTC()}
	if in.MemoryMB != nil {
		b.MemoryMB = *in.MemoryMB
	}
	if in.CPUCount != nil {
		b.CPUCount = *in.CPUCount
	}
	if err := s.cfg.Sandboxes.CreateE2BBuild(ctx, b); err != nil {
		return 0, nil, fmt.Errorf("recording template build: %w", err)
	}
	tags := in.Tags
	if tags == nil {
		tags = []string{}
	}
	return http.StatusAccepted, map[string]any{"templateID": in.Name, "buildID": b.ID, "public": false,
		"names": []string{in.Name}, "aliases": []string{in.Name}, "tags": tags}, nil
}

// imageOf reads the account's kiln image through the AWS API; found is
// false when there is none.
func (s *Server) imageOf(ctx context.Context, key store.AccessKey, name string) (img struct {
	Name                     string `json:"name"`
	State                    string `json:"state"`
	LatestActiveImageVersion string `json:"latestActiveImageVersion"`
	CreatedAt                json.Number
	UpdatedAt                json.Number
}, found bool, err error) {
	err = s.op(ctx, key, "GET", "/microvm-images/"+url.PathEscape(name), nil, nil, &img)
	var ae *apiError
	if errors.As(err, &ae) && ae.Code == 404 {
		return img, false, nil
	}
	return img, err == nil, err
}

// managedARN is the ARN of kiln's managed debian-12 base, as the API
// lists it.
func (s *Server) managedARN(ctx context.Context, key store.AccessKey) (string, error) {
	var out struct {
		Items []struct {
			ImageArn string `json:"imageArn"`
		} `json:"items"`
	}
	if err := s.op(ctx, key, "GET", "/managed-microvm-images", nil, nil, &out); err != nil {
		return "", err
	}
	for _, it := range out.Items {
		if strings.HasSuffix(it.ImageArn, ":debian-12") {
			return it.ImageArn, nil
		}
	}
	return "", errorf(500, "this kiln server lists no managed debian-12 base")
}

// triggerBuild is POST /v2/templates/{templateID}/builds/{buildID}: the
// steps become a Dockerfile, the Dockerfile and the uploaded files a code
// package, and the package a new version of the image.
func (s *Server) triggerBuild(ctx context.Context, q *request) (int, any, error) {
	if err := s.templatesOn(); err != nil {
		return 0, nil, err
	}
	account := q.key.Account
	tid, bid := q.r.PathValue("templateID"), q.r.PathValue("buildID")
	b, err := s.loadBuild(ctx, account, tid, bid)
	if err != nil {
		return 0, nil, err
	}
	// One trigger per build: a second, even while the first is packing,
	// is a conflict. Other builds go on meanwhile.
	inflight := account + "/" + bid
	s.tpl.mu.Lock()
	busy := s.tpl.triggering[inflight]
	s.tpl.triggering[inflight] = true
	s.tpl.mu.Unlock()
	if busy {
		return 0, nil, errorf(409, "template build %s is being started; request a new build", bid)
	}
	defer func() {
		s.tpl.mu.Lock()
		delete(s.tpl.triggering, inflight)
		s.tpl.mu.Unlock()
	}()
	if b, err = s.loadBuild(ctx, account, tid, bid); err != nil {
		return 0, nil, err
	}
	if b.Version != "" {
		return 0, nil, errorf(409, "template build %s was already started (image version %s); request a new build", bid, b.Version)
	}
	in, err := parseBuildStart(q.body)
	if err != nil {
		return 0, nil, err
	}
	from := in.FromImage
	if from == "" {
		from = in.FromTemplate
	}
	base, debian := managedBase(from)
	var head *baseImage
	if base == "" {
		if debian {
			return 0, nil, errorf(400, "fromImage %q: kiln's only Debian is its managed debian-12 (bookworm); use fromDebianImage('bookworm')", from)
		}
		if head, err = s.kilnBase(ctx, q.key, from); err != nil {
			return 0, nil, err
		}
	}
	plan := in.dockerfile(base, b.ID, head.dockerfile())
	uri, err := s.packTemplate(ctx, q.key, plan, head)
	if err != nil {
		return 0, nil, err
	}
	arn, err := s.managedARN(ctx, q.key)
	if err != nil {
		return 0, nil, err
	}
	cfg := map[string]any{"baseImageArn": arn, "buildRoleArn": "arn:aws:iam::" + account + ":role/e2b-template-build",
		"codeArtifact": map[string]string{"uri": uri}, "description": "E2B template build " + b.ID}
	if b.MemoryMB > 0 {
		mem := api.MemorySizesMiB[len(api.MemorySizesMiB)-1]
		for _, m := range api.MemorySizesMiB {
			if m >= b.MemoryMB {
				mem = m
				break
			}
		}
		cfg["resources"] = []map[string]int64{{"minimumMemoryInMiB": mem}}
	}
	_, exists, err := s.imageOf(ctx, q.key, tid)
	if err != nil {
		return 0, nil, err
	}
	if err := s.checkTagRoom(ctx, account, tid, b.Tags); err != nil {
		return 0, nil, err
	}
	var out struct {
		ImageVersion string `json:"imageVersion"`
	}
	if exists {
		err = s.op(ctx, q.key, "PUT", "/microvm-images/"+url.PathEscape(tid), nil, cfg, &out)
	} else {
		cfg["name"] = tid
		err = s.op(ctx, q.key, "POST", "/microvm-images", nil, cfg, &out)
	}
	if err != nil {
		return 0, nil, err
	}
	b.Version = out.ImageVersion
	// The version exists now: the build records it even if the caller has
	// gone.
	ctx = context.WithoutCancel(ctx)
	if err := s.cfg.Sandboxes.StartE2BBuild(ctx, account, b.ID, b.Version); err != nil {
		if errors.Is(err, errdefs.ErrConflict) {
			// Started meanwhile through another replica: the version
			// made here is one too many.
			s.op(ctx, q.key, "DELETE", "/microvm-images/"+url.PathEscape(tid)+"/versions/"+url.PathEscape(b.Version), nil, nil, nil)
			return 0, nil, errorf(409, "template build %s was started meanwhile; request a new build", bid)
		}
		return 0, nil, fmt.Errorf("recording template build: %w", err)
	}
	// The build's tags name it from now on; a Sandbox.create of a tag
	// whose build is still running is refused by RunMicrovm until it is
	// ready.
	if err := s.setTags(ctx, account, tid, b.Tags, b.ID, b.Version); err != nil {
		return 0, nil, err
	}
	slog.Info("e2b template build started", "account", account, "template", tid, "build", bid, "version", b.Version)
	return http.StatusAccepted, nil, nil
}

// logEntry is E2B's BuildLogEntry.
type logEntry struct {
	Timestamp string `json:"timestamp"`
	Level     string `json:"level"`
	Message   string `json:"message"`
	Step      string `json:"step,omitempty"`
}

// maxLogEntries bounds the entries one status call returns; the SDK asks
// again from where it stopped.
const maxLogEntries = 500

// buildStatus is GET /templates/{templateID}/builds/{buildID}/status:
// the version's state as E2B's (building, ready, error with a reason) and
// the build log's lines from logsOffset as log entries.
func (s *Server) buildStatus(ctx context.Context, q *request) (int, any, error) {
	if err := s.templatesOn(); err != nil {
		return 0, nil, err
	}
	account := q.key.Account
	tid, bid := q.r.PathValue("templateID"), q.r.PathValue("buildID")
	b, err := s.loadBuild(ctx, account, tid, bid)
	if err != nil {
		return 0, nil, err
	}
	offset := 0
	if o := q.r.URL.Query().Get("logsOffset"); o != "" {
		if offset, err = strconv.Atoi(o); err != nil || offset < 0 {
			return 0, nil, errorf(400, "logsOffset must be a non-negative integer")
		}
	}
	out := map[string]any{"templateID": tid, "buildID": bid, "logs": []string{}, "logEntries": []logEntry{}}
	if b.Version == "" {
		out["status"] = "waiting"
		return 200, out, nil
	}
	var v struct {
		State       string `json:"state"`
		StateReason string `json:"stateReason"`
	}
	vpath := "/microvm-images/" + url.PathEscape(tid) + "/versions/" + url.PathEscape(b.Version)
	if err := s.op(ctx, q.key, "GET", vpath, nil, nil, &v); err != nil {
		return 0, nil, err
	}
	entries, err := s.buildLog(ctx, q.key, tid, b, offset)
	if err != nil {
		return 0, nil, err
	}
	out["logEntries"] = entries
	switch v.State {
	case store.VersionSuccessful:
		out["status"] = "ready"
	case store.VersionFailed:
		out["status"] = "error"
		reason := v.StateReason
		if reason == "" {
			reason = "the build failed (kiln logs the reason in the build log)"
		}
		out["reason"] = map[string]any{"message": reason, "logEntries": []logEntry{}}
	default:
		out["status"] = "building"
	}
	return 200, out, nil
}

// buildLog returns the build's log lines from entry offset on, as E2B log
// entries (at most maxLogEntries; a line still being written waits).
func (s *Server) buildLog(ctx context.Context, key store.AccessKey, tid string, b store.E2BBuild, offset int) ([]logEntry, error) {
	entries := []logEntry{}
	logPath, err := s.buildLogPath(ctx, key, tid, b.Version)
	if err != nil || logPath == "" {
		return entries, err
	}
	ck := key.Account + "/" + b.ID
	s.tpl.mu.Lock()
	cur, ok := s.tpl.logs[ck]
	s.tpl.mu.Unlock()
	if !ok || cur.entries > offset {
		cur = logCursor{}
	}
	now := s.cfg.Now().UTC().Format(time.RFC3339Nano)
	for range 64 { // bounded: 64 MiB of log per call at most
		chunk, next, err := s.logChunk(ctx, key, logPath, cur.byteOff)
		if err != nil {
			return nil, err
		}
		if chunk == "" {
			break
		}
		cur.byteOff = next
		text := cur.partial + chunk
		lines := strings.Split(text, "\n")
		cur.partial = lines[len(lines)-1]
		for _, l := range lines[:len(lines)-1] {
			if cur.entries >= offset && len(entries) < maxLogEntries {
				entries = append(entries, logEntry{Timestamp: now, Level: levelOf(l), Message: l})
			}
			cur.entries++
		}
		if len(entries) >= maxLogEntries {
			break
		}
	}
	if len(entries) < maxLogEntries {
		// Only a cursor that served everything up to it can be resumed.
		s.tpl.mu.Lock()
		if len(s.tpl.logs) >= maxLogCursors {
			s.tpl.logs = map[string]logCursor{}
		}
		s.tpl.logs[ck] = cur
		s.tpl.mu.Unlock()
	}
	return entries, nil
}

// buildLogPath is kiln's route to the log of the version's build; "" while
// the version has none yet.
func (s *Server) buildLogPath(ctx context.Context, key store.AccessKey, tid, version string) (string, error) {
	var builds struct {
		Items []struct {
			BuildID string `json:"buildId"`
		} `json:"items"`
	}
	vpath := "/microvm-images/" + url.PathEscape(tid) + "/versions/" + url.PathEscape(version)
	if err := s.op(ctx, key, "GET", vpath+"/builds", nil, nil, &builds); err != nil {
		return "", err
	}
	if len(builds.Items) == 0 {
		return "", nil
	}
	return "/kiln/v1" + vpath + "/builds/" + url.PathEscape(builds.Items[0].BuildID) + "/log", nil
}

// logChunk reads the build log at logPath from byte offset off; "" at its
// end.
func (s *Server) logChunk(ctx context.Context, key store.AccessKey, logPath string, off int64) (string, int64, error) {
	var chunk struct {
		Log        string `json:"log"`
		NextOffset int64  `json:"nextOffset"`
	}
	err := s.rawOp(ctx, key, "GET", logPath, url.Values{"offset": {strconv.FormatInt(off, 10)}}, &chunk)
	return chunk.Log, chunk.NextOffset, err
}

// eachLogLine calls fn with the version's build log's complete lines, in
// order, until fn returns false (at most 64 MiB of log).
func (s *Server) eachLogLine(ctx context.Context, key store.AccessKey, tid, version string, fn func(string) bool) error {
	logPath, err := s.buildLogPath(ctx, key, tid, version)
	if err != nil || logPath == "" {
		return err
	}
	var off int64
	partial := ""
	for range 64 {
		chunk, next, err := s.logChunk(ctx, key, logPath, off)
		if err != nil || chunk == "" {
			return err
		}
		off = next
		lines := strings.Split(partial+chunk, "\n")
		partial = lines[len(lines)-1]
		for _, l := range lines[:len(lines)-1] {
			if !fn(l) {
				return nil
			}
		}
	}
	return nil
}

// levelOf gives a build log line E2B's level: kiln marks failures with
// "error" words; the rest is info.
func levelOf(line string) string {
	l := strings.ToLower(line)
	if strings.HasPrefix(l, "error") || strings.Contains(l, " failed") {
		return "error"
	}
	return "info"
}

// rawOp is op for kiln's own routes (not under the API version).
func (s *Server) rawOp(ctx context.Context, key store.AccessKey, method, path string, query url.Values, out any) error {
	return s.opPath(ctx, key, method, path, query, nil, out)
}

// templateAlias is GET /templates/aliases/{alias}: whether the account
// has an image of that name.
func (s *Server) templateAlias(ctx context.Context, q *request) (int, any, error) {
	alias := q.r.PathValue("b")
	if err := s.templateExists(ctx, q.key, alias); err != nil {
		return 0, nil, err
	}
	return 200, map[string]any{"templateID": alias, "public": false}, nil
}

// templateOut is E2B's Template (list).
type templateOut struct {
	TemplateID    string   `json:"templateID"`
	BuildID       string   `json:"buildID"`
	Aliases       []string `json:"aliases"`
	Names         []string `json:"names"`
	Public        bool     `json:"public"`
	CPUCount      int64    `json:"cpuCount"`
	MemoryMB      int64    `json:"memoryMB"`
	DiskSizeMB    int64    `json:"diskSizeMB"`
	EnvdVersion   string   `json:"envdVersion"`
	BuildStatus   string   `json:"buildStatus"`
	BuildCount    int      `json:"buildCount"`
	SpawnCount    int64    `json:"spawnCount"`
	CreatedAt     string   `json:"createdAt"`
	UpdatedAt     string   `json:"updatedAt"`
	LastSpawnedAt *string  `json:"lastSpawnedAt"`
	CreatedBy     *string  `json:"createdBy"`
}

// listTemplates is GET /templates: the account's kiln images, every one
// usable as a template by name.
func (s *Server) listTemplates(ctx context.Context, q *request) (int, any, error) {
	out := []templateOut{}
	token := ""
	for range 100 { // bounded: 100 pages of 50
		var page struct {
			Items []struct {
				Name                     string  `json:"name"`
				State                    string  `json:"state"`
				CreatedAt                float64 `json:"createdAt"`
				LatestActiveImageVersion string  `json:"latestActiveImageVersion"`
			} `json:"items"`
			NextToken string `json:"nextToken"`
		}
		query := url.Values{}
		if token != "" {
			query.Set("nextToken", token)
		}
		if err := s.op(ctx, q.key, "GET", "/microvm-images", query, nil, &page); err != nil {
			return 0, nil, err
		}
		for _, it := range page.Items {
			created := time.Unix(0, int64(it.CreatedAt*1e9)).UTC().Format(time.RFC3339)
			status := "building"
			switch {
			case it.LatestActiveImageVersion != "":
				status = "ready"
			case strings.HasSuffix(it.State, "FAILED"):
				status = "error"
			}
			out = append(out, templateOut{TemplateID: it.Name, BuildID: it.LatestActiveImageVersion, Aliases: []string{it.Name},
				Names: []string{it.Name}, CPUCount: 1, MemoryMB: 2048, EnvdVersion: EnvdVersion, BuildStatus: status,
				CreatedAt: created, UpdatedAt: created})
		}
		if page.NextToken == "" {
			break
		}
		token = page.NextToken
	}
	slices.SortFunc(out, func(a, b templateOut) int { return strings.Compare(a.TemplateID, b.TemplateID) })
	return 200, out, nil
}

// deleteTemplate is DELETE /templates/{templateID}: DeleteMicrovmImage,
// whose record takes the template's tags, builds and snapshot record with
// it (in the store).
func (s *Server) deleteTemplate(ctx context.Context, q *request) (int, any, error) {
	tid := q.r.PathValue("templateID")
	if !templateNameRE.MatchString(tid) {
		return 0, nil, errorf(404, "template %q not found", tid)
	}
	if err := s.op(ctx, q.key, "DELETE", "/microvm-images/"+url.PathEscape(tid), nil, nil, nil); err != nil {
		return 0, nil, err
	}
	return http.StatusNoContent, nil, nil
}
