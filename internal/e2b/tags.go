package e2b

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// E2B tags name builds of a template: `Template.build(t, 'name:v2')`,
// `Template.assignTags('name:v2', 'prod')` and `Sandbox.create('name:prod')`.
// kiln keeps, per account and template, which build (image version) each
// tag names, in the store (store.E2BTemplateStore), so that every replica
// of a control plane resolves a tag alike. A tag that is no tag of the
// template is read as a kiln image version ("name:3"), as the AWS API
// names versions.

// defaultTag is E2B's name for a template's newest build.
const defaultTag = "default"

// setTags points tags at a build, in one update of the template's tags.
func (s *Server) setTags(ctx context.Context, account, tid string, tags []string, bid, version string) error {
	err := s.cfg.Sandboxes.AssignE2BTags(ctx, account, tid, tags, bid, version, s.cfg.Now().UTC())
	if errors.Is(err, errdefs.ErrExhausted) {
		return errorf(400, "template %s would have more than %d tags, kiln's bound per template: remove some (Template.removeTags)", tid, store.MaxE2BTags)
	}
	return err
}

// checkTagRoom refuses, before a build starts, tags that would take the
// template past store.MaxE2BTags. (The assignment checks again, in its
// transaction: this is to fail before the build, not instead.)
func (s *Server) checkTagRoom(ctx context.Context, account, tid string, tags []string) error {
	have, err := s.cfg.Sandboxes.ListE2BTags(ctx, account, tid)
	if err != nil {
		return err
	}
	n := len(have)
	for i, t := range tags {
		if !slices.ContainsFunc(have, func(r store.E2BTag) bool { return r.Tag == t }) && !slices.Contains(tags[:i], t) {
			n++
		}
	}
	if n > store.MaxE2BTags {
		return errorf(400, "template %s would have %d tags; kiln keeps at most %d per template: remove some (Template.removeTags)", tid, n, store.MaxE2BTags)
	}
	return nil
}

// tagged returns the tag's record, if the template has the tag.
func (s *Server) tagged(ctx context.Context, account, tid, tag string) (store.E2BTag, bool, error) {
	rec, err := s.cfg.Sandboxes.GetE2BTag(ctx, account, tid, tag)
	if errors.Is(err, errdefs.ErrNotFound) {
		return rec, false, nil
	}
	return rec, err == nil, err
}

// resolveTemplate turns a templateID of Sandbox.create (NAME, NAME:TAG,
// NAME:VERSION or an image ARN) into the image and version to run
// (version "": the latest active one).
func (s *Server) resolveTemplate(ctx context.Context, account, templateID string) (name, version string, err error) {
	name, tag, ok := strings.Cut(templateID, ":")
	if !ok || strings.HasPrefix(templateID, "arn:") {
		return templateID, "", nil
	}
	if templateNameRE.MatchString(name) && tagRE.MatchString(tag) {
		rec, found, err := s.tagged(ctx, account, name, tag)
		if err != nil {
			return "", "", err
		}
		if found {
			return name, rec.Version, nil
		}
	}
	if tag == defaultTag {
		return name, "", nil
	}
	return name, tag, nil
}

// versionBuildID is the E2B build id of an image version: the id of the
// E2B build that made it, or, for a version built through the AWS API,
// one derived from the account, image and version (stable, so tags and
// build routes can name it).
func (s *Server) versionBuildID(ctx context.Context, account, tid, version string) (string, error) {
	b, err := s.cfg.Sandboxes.E2BBuildOfVersion(ctx, account, tid, version)
	if err == nil {
		return b.ID, nil
	}
	if !errors.Is(err, errdefs.ErrNotFound) {
		return "", err
	}
	h := sha256.Sum256([]byte("kiln e2b build\x00" + account + "\x00" + tid + "\x00" + version))
	x := hex.EncodeToString(h[:16])
	return x[:8] + "-" + x[8:12] + "-" + x[12:16] + "-" + x[16:20] + "-" + x[20:32], nil
}

// versionOut is the part of the AWS API's image version E2B reports.
type versionOut struct {
	ImageVersion string  `json:"imageVersion"`
	State        string  `json:"state"`
	StateReason  string  `json:"stateReason"`
	CreatedAt    float64 `json:"createdAt"`
	UpdatedAt    float64 `json:"updatedAt"`
	ImageConfig  struct {
		Resources []struct {
			MinimumMemoryInMiB int64 `json:"minimumMemoryInMiB"`
		} `json:"resources"`
	} `json:"imageConfig"`
}

// versions pages through the image's versions (the AWS API's
// ListMicrovmImageVersions: its checks, its 404 for another account's).
func (s *Server) versions(ctx context.Context, key store.AccessKey, tid string, limit int, token string) ([]versionOut, string, error) {
	var page struct {
		Items     []versionOut `json:"items"`
		NextToken string       `json:"nextToken"`
	}
	// ListMicrovmImageVersions pages by at most 50.
	q := url.Values{"maxResults": {fmt.Sprint(min(limit, 50))}}
	if token != "" {
		q.Set("nextToken", token)
	}
	err := s.op(ctx, key, "GET", "/microvm-images/"+url.PathEscape(tid)+"/versions", q, nil, &page)
	return page.Items, page.NextToken, err
}

// buildVersion is the image version of the template's build bid: an E2B
// build's, or the version whose derived id bid is.
func (s *Server) buildVersion(ctx context.Context, key store.AccessKey, tid, bid string) (string, error) {
	if !templateNameRE.MatchString(tid) || !buildIDRE.MatchString(bid) {
		return "", errorf(404, "template build %s of %s not found", bid, tid)
	}
	if b, err := s.loadBuild(ctx, key.Account, tid, bid); err == nil {
		if b.Version == "" {
			return "", errorf(404, "template build %s was requested but not started (POST /v2/templates/%s/builds/%s starts it)", bid, tid, bid)
		}
		return b.Version, nil
	}
	token := ""
	for range 100 { // bounded: 100 pages of 100
		vs, next, err := s.versions(ctx, key, tid, 100, token)
		if err != nil {
			return "", err
		}
		for _, v := range vs {
			id, err := s.versionBuildID(ctx, key.Account, tid, v.ImageVersion)
			if err != nil {
				return "", err
			}
			if id == bid {
				return v.ImageVersion, nil
			}
		}
		if next == "" {
			break
		}
		token = next
	}
	return "", errorf(404, "template build %s of %s not found", bid, tid)
}

// tagRequest is E2B's AssignTemplateTagsRequest and DeleteTemplateTagsRequest.
type tagRequest struct {
	Target string   `json:"target"`
	Name   string   `json:"name"`
	Tags   []string `json:"tags"`
}

func parseTagRequest(body []byte, assign bool) (tagRequest, error) {
	var in tagRequest
	if err := json.Unmarshal(body, &in); err != nil {
		return in, errorf(400, "request body is not valid JSON: %v", err)
	}
	if len(in.Tags) == 0 || len(in.Tags) > 16 {
		return in, errorf(400, "give 1 to 16 tags")
	}
	for _, t := range in.Tags {
		if !tagRE.MatchString(t) {
			return in, errorf(400, "tag %q: tags are 1-64 letters, digits, _ . -", t)
		}
		if assign && t == defaultTag {
			return in, errorf(400, "tag %q names a template's newest build; it cannot be assigned", t)
		}
	}
	n := in.Name
	if assign {
		n, _, _ = strings.Cut(in.Target, ":")
	}
	if !templateNameRE.MatchString(n) {
		return in, errorf(400, "template name %q: 1-128 letters, digits, _ . - (a kiln image name)", n)
	}
	return in, nil
}

// assignTags is POST /templates/tags: the tags name the build that target
// ("name:tag" or "name", its newest build) names.
func (s *Server) assignTags(ctx context.Context, q *request) (int, any, error) {
	in, err := parseTagRequest(q.body, true)
	if err != nil {
		return 0, nil, err
	}
	tid, src, _ := strings.Cut(in.Target, ":")
	img, found, err := s.imageOf(ctx, q.key, tid)
	if err != nil {
		return 0, nil, err
	}
	if !found {
		return 0, nil, errorf(404, "template %q not found", tid)
	}
	var bid, version string
	rec, tagFound, err := s.tagged(ctx, q.key.Account, tid, src)
	switch {
	case err != nil:
		return 0, nil, err
	case tagFound:
		bid, version = rec.BuildID, rec.Version
	case src == "" || src == defaultTag:
		if img.LatestActiveImageVersion == "" {
			return 0, nil, errorf(404, "template %s has no ready build to tag", tid)
		}
		version = img.LatestActiveImageVersion
	default:
		if _, err := s.cfg.Store.GetImageVersion(ctx, q.key.Account, tid, src); err != nil {
			return 0, nil, errorf(404, "template %s has no tag or version %q", tid, src)
		}
		version = src
	}
	if bid == "" {
		if bid, err = s.versionBuildID(ctx, q.key.Account, tid, version); err != nil {
			return 0, nil, err
		}
	}
	if err := s.setTags(ctx, q.key.Account, tid, in.Tags, bid, version); err != nil {
		return 0, nil, err
	}
	return http.StatusCreated, map[string]any{"buildID": bid, "tags": in.Tags}, nil
}

// removeTags is DELETE /templates/tags.
func (s *Server) removeTags(ctx context.Context, q *request) (int, any, error) {
	in, err := parseTagRequest(q.body, false)
	if err != nil {
		return 0, nil, err
	}
	err = s.cfg.Sandboxes.RemoveE2BTags(ctx, q.key.Account, in.Name, in.Tags)
	if errors.Is(err, errdefs.ErrNotFound) {
		return 0, nil, errorf(404, "%v", err)
	}
	if err != nil {
		return 0, nil, err
	}
	return http.StatusNoContent, nil, nil
}

// templateTags is GET /templates/{templateID}/tags.
func (s *Server) templateTags(ctx context.Context, q *request) (int, any, error) {
	tid := q.r.PathValue("a")
	if err := s.templateExists(ctx, q.key, tid); err != nil {
		return 0, nil, err
	}
	recs, err := s.cfg.Sandboxes.ListE2BTags(ctx, q.key.Account, tid)
	if err != nil {
		return 0, nil, err
	}
	out := make([]map[string]string, 0, len(recs))
	for _, r := range recs {
		out = append(out, map[string]string{"tag": r.Tag, "buildID": r.BuildID, "createdAt": r.CreatedAt.Format(time.RFC3339)})
	}
	return 200, out, nil
}

// templateExists is a 404 unless the account has an image named tid.
func (s *Server) templateExists(ctx context.Context, key store.AccessKey, tid string) error {
	if !templateNameRE.MatchString(tid) {
		return errorf(404, "template %q not found", tid)
	}
	_, found, err := s.imageOf(ctx, key, tid)
	if err != nil {
		return err
	}
	if !found {
		return errorf(404, "template %q not found", tid)
	}
	return nil
}
