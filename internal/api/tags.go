package api

import (
	"context"
	"errors"
	"fmt"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// taggable resolves the {Resource} ARN of a tag operation to a resource of
// the caller's account that exists.
func (s *Server) taggable(ctx context.Context, c *call) (string, error) {
	arn := c.path("Resource")
	if arn == "" {
		return "", fieldError("Resource", nil, "Member must not be null")
	}
	a, ok := parseARN(arn)
	if !ok {
		return "", fieldError("Resource", arn, "Member must be the ARN of a microVM or microVM image")
	}
	if a.account != c.account {
		return "", notFound(a.kind, arn)
	}
	var err error
	switch a.kind {
	case kindMicrovm:
		_, err = s.st.GetMicrovm(ctx, c.account, a.id)
	case kindImage:
		_, err = s.st.GetImage(ctx, c.account, a.id)
	default:
		return "", fieldError("Resource", arn, "Member must be the ARN of a microVM or microVM image")
	}
	if err != nil {
		return "", toAPIError(err, a.kind, arn)
	}
	// Tags are keyed by the canonical ARN, whatever region the caller wrote.
	return s.arn(c.account, a.kind, a.id), nil
}

func (s *Server) listTags(ctx context.Context, c *call) (any, error) {
	arn, err := s.taggable(ctx, c)
	if err != nil {
		return nil, err
	}
	tags, err := s.st.GetTags(ctx, c.account, arn)
	if err != nil {
		return nil, err
	}
	return map[string]any{"Tags": tags}, nil
}

func (s *Server) tagResource(ctx context.Context, c *call) (any, error) {
	var in struct {
		Tags map[string]string `json:"Tags"`
	}
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	arn, err := s.taggable(ctx, c)
	if err != nil {
		return nil, err
	}
	if in.Tags == nil {
		return nil, fieldError("Tags", nil, "Member must not be null")
	}
	if err := validateTags("Tags", in.Tags); err != nil {
		return nil, err
	}
	err = s.st.TagResource(ctx, c.account, arn, in.Tags)
	var many *store.TooManyTagsError
	if errors.As(err, &many) {
		return nil, &Error{Status: 402, Type: "ServiceQuotaExceededException", Message: many.Error(), ResourceID: arn}
	}
	return nil, err
}

func (s *Server) untagResource(ctx context.Context, c *call) (any, error) {
	arn, err := s.taggable(ctx, c)
	if err != nil {
		return nil, err
	}
	keys := c.r.URL.Query()["tagKeys"]
	if len(keys) == 0 {
		return nil, fieldError("tagKeys", nil, "Member must not be null")
	}
	return nil, s.st.UntagResource(ctx, c.account, arn, keys)
}

// Managed base images.

// managed lists the managed base images.
func (s *Server) managed() []ManagedImage {
	if s.cfg.ManagedSource != nil {
		if l := s.cfg.ManagedSource(); len(l) > 0 {
			return l
		}
	}
	return s.cfg.ManagedImages
}

func (s *Server) managedByARN(arn string) (ManagedImage, bool) {
	a, ok := parseARN(arn)
	if !ok || a.kind != kindImage || a.account != managedAccount {
		return ManagedImage{}, false
	}
	for _, m := range s.managed() {
		if m.Name == a.id {
			return m, true
		}
	}
	return ManagedImage{}, false
}

type managedImageOut struct {
	ImageArn  string `json:"imageArn"`
	CreatedAt *epoch `json:"createdAt"`
	UpdatedAt *epoch `json:"updatedAt,omitempty"`
}

type managedVersionOut struct {
	ImageArn     string `json:"imageArn"`
	ImageVersion string `json:"imageVersion"`
	CreatedAt    *epoch `json:"createdAt"`
	Status       string `json:"status,omitempty"`
	UpdatedAt    *epoch `json:"updatedAt,omitempty"`
}

// staticPage pages through an in-memory list; the token is the offset.
func staticPage[T any](c *call, all []T) (listOut[T], error) {
	p, err := pageOf(c, 50)
	if err != nil {
		return listOut[T]{}, err
	}
	start := 0
	if p.Token != "" {
		if _, err := fmt.Sscanf(p.Token, "o%d", &start); err != nil || start < 0 || start > len(all) {
			return listOut[T]{}, fieldError("nextToken", p.Token, "Member must be a token returned by a previous call")
		}
	}
	end := min(start+p.Limit, len(all))
	out := listOut[T]{Items: append([]T{}, all[start:end]...)}
	if end < len(all) {
		out.NextToken = fmt.Sprintf("o%d", end)
	}
	return out, nil
}

func (s *Server) listManagedImages(ctx context.Context, c *call) (any, error) {
	var all []managedImageOut
	for _, m := range s.managed() {
		all = append(all, managedImageOut{ImageArn: s.arn(managedAccount, kindImage, m.Name), CreatedAt: ts(m.CreatedAt), UpdatedAt: ts(m.CreatedAt)})
	}
	return staticPage(c, all)
}

func (s *Server) listManagedImageVersions(ctx context.Context, c *call) (any, error) {
	ident := c.path("imageIdentifier")
	var mi ManagedImage
	found := false
	for _, m := range s.managed() {
		if m.Name == ident || s.arn(managedAccount, kindImage, m.Name) == ident {
			mi, found = m, true
		}
	}
	if !found {
		if m, ok := s.managedByARN(ident); ok {
			mi, found = m, true
		}
	}
	if !found {
		return nil, notFound(kindImage, ident)
	}
	var all []managedVersionOut
	for _, v := range mi.Versions {
		all = append(all, managedVersionOut{ImageArn: s.arn(managedAccount, kindImage, mi.Name), ImageVersion: v.Version,
			CreatedAt: ts(v.CreatedAt), Status: v.Status, UpdatedAt: ts(v.CreatedAt)})
	}
	return staticPage(c, all)
}
