package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
	"github.com/kiln-sandbox/kiln/internal/store"
)

type imageInput struct {
	store.ImageConfig
	Name        string            `json:"name,omitempty"`
	Tags        map[string]string `json:"tags,omitempty"`
	ClientToken string            `json:"clientToken,omitempty"`
}

// imageConfigOut is CreateMicrovmImageResponse and UpdateMicrovmImageResponse.
type imageConfigOut struct {
	ImageArn                 string `json:"imageArn"`
	Name                     string `json:"name"`
	State                    string `json:"state"`
	CreatedAt                *epoch `json:"createdAt"`
	UpdatedAt                *epoch `json:"updatedAt,omitempty"`
	ImageVersion             string `json:"imageVersion"`
	LatestActiveImageVersion string `json:"latestActiveImageVersion,omitempty"`
	LatestFailedImageVersion string `json:"latestFailedImageVersion,omitempty"`
	store.ImageConfig
	Tags map[string]string `json:"tags,omitempty"`
}

type imageOut struct {
	ImageArn                 string            `json:"imageArn"`
	Name                     string            `json:"name"`
	State                    string            `json:"state"`
	CreatedAt                *epoch            `json:"createdAt"`
	LatestActiveImageVersion string            `json:"latestActiveImageVersion,omitempty"`
	LatestFailedImageVersion string            `json:"latestFailedImageVersion,omitempty"`
	Tags                     map[string]string `json:"tags,omitempty"`
	UpdatedAt                *epoch            `json:"updatedAt,omitempty"`
}

type versionOut struct {
	store.ImageConfig
	ImageArn     string            `json:"imageArn"`
	ImageVersion string            `json:"imageVersion"`
	State        string            `json:"state"`
	Status       string            `json:"status"`
	CreatedAt    *epoch            `json:"createdAt"`
	UpdatedAt    *epoch            `json:"updatedAt,omitempty"`
	StateReason  string            `json:"stateReason,omitempty"`
	Tags         map[string]string `json:"tags,omitempty"`
}

type buildOut struct {
	ImageArn          string               `json:"imageArn"`
	ImageVersion      string               `json:"imageVersion"`
	BuildID           string               `json:"buildId"`
	BuildState        string               `json:"buildState"`
	Architecture      string               `json:"architecture"`
	Chipset           string               `json:"chipset"`
	ChipsetGeneration string               `json:"chipsetGeneration"`
	CreatedAt         *epoch               `json:"createdAt"`
	StateReason       string               `json:"stateReason,omitempty"`
	SnapshotBuild     *store.SnapshotBuild `json:"snapshotBuild,omitempty"`
}

func versionView(v store.ImageVersion, tags map[string]string) versionOut {
	return versionOut{ImageConfig: v.Config, ImageArn: v.ImageARN, ImageVersion: v.Version, State: v.State, Status: v.Status,
		CreatedAt: ts(v.CreatedAt), UpdatedAt: ts(v.UpdatedAt), StateReason: v.StateReason, Tags: tags}
}

func buildView(b store.Build) buildOut {
	return buildOut{ImageArn: b.ImageARN, ImageVersion: b.Version, BuildID: b.ID, BuildState: b.State, Architecture: b.Architecture,
		Chipset: b.Chipset, ChipsetGeneration: b.ChipsetGeneration, CreatedAt: ts(b.CreatedAt), StateReason: b.StateReason, SnapshotBuild: b.Snapshot}
}

func configView(img store.Image, v store.ImageVersion, tags map[string]string) imageConfigOut {
	return imageConfigOut{ImageArn: img.ARN, Name: img.Name, State: img.State, CreatedAt: ts(img.CreatedAt), UpdatedAt: ts(img.UpdatedAt),
		ImageVersion: v.Version, LatestActiveImageVersion: img.LatestActiveVersion, LatestFailedImageVersion: img.LatestFailedVersion,
		ImageConfig: v.Config, Tags: tags}
}

var (
	envKeyRE = regexp.MustCompile(`^[^\s=]{1,256}$`)
)

func validateLogging(field string, raw json.RawMessage) error {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var l struct {
		Disabled   *struct{} `json:"disabled"`
		CloudWatch *struct {
			LogGroup  string `json:"logGroup"`
			LogStream string `json:"logStream"`
		} `json:"cloudWatch"`
	}
	if err := json.Unmarshal(raw, &l); err != nil {
		return fieldError(field, nil, "Member must be a structure with one of disabled, cloudWatch")
	}
	if (l.Disabled == nil) == (l.CloudWatch == nil) {
		return fieldError(field, nil, "Member must set exactly one of disabled, cloudWatch")
	}
	return nil
}

func hookState(field, v string) error {
	if v != "" && v != "ENABLED" && v != "DISABLED" {
		return fieldError(field, v, "Member must satisfy enum value set: [ENABLED, DISABLED]")
	}
	return nil
}

// hookTimeout checks a hook timeout: runtime hooks (run, resume, suspend,
// terminate) may take at most 60 s, build hooks (ready, validate) 3600 s.
func hookTimeout(field string, v *int64, max int64) error {
	if v != nil && (*v < 1 || *v > max) {
		return fieldError(field, *v, fmt.Sprintf("Member must have value between 1 and %d", max))
	}
	return nil
}

func validateHooks(h *store.Hooks) error {
	if h == nil {
		return nil
	}
	if h.Port != nil && (*h.Port < 1 || *h.Port > 65535) {
		return fieldError("hooks.port", *h.Port, "Member must have value between 1 and 65535")
	}
	var errs []error
	if m := h.MicrovmHooks; m != nil {
		errs = append(errs,
			hookState("hooks.microvmHooks.run", m.Run), hookTimeout("hooks.microvmHooks.runTimeoutInSeconds", m.RunTimeoutInSeconds, 60),
			hookState("hooks.microvmHooks.resume", m.Resume), hookTimeout("hooks.microvmHooks.resumeTimeoutInSeconds", m.ResumeTimeoutInSeconds, 60),
			hookState("hooks.microvmHooks.suspend", m.Suspend), hookTimeout("hooks.microvmHooks.suspendTimeoutInSeconds", m.SuspendTimeoutInSeconds, 60),
			hookState("hooks.microvmHooks.terminate", m.Terminate), hookTimeout("hooks.microvmHooks.terminateTimeoutInSeconds", m.TerminateTimeoutInSeconds, 60))
	}
	if m := h.MicrovmImageHooks; m != nil {
		errs = append(errs,
			hookState("hooks.microvmImageHooks.ready", m.Ready), hookTimeout("hooks.microvmImageHooks.readyTimeoutInSeconds", m.ReadyTimeoutInSeconds, 3600),
			hookState("hooks.microvmImageHooks.validate", m.Validate), hookTimeout("hooks.microvmImageHooks.validateTimeoutInSeconds", m.ValidateTimeoutInSeconds, 3600))
	}
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

func validateTags(field string, tags map[string]string) error {
	if len(tags) > 50 {
		return fieldError(field, nil, "Member must have at most 50 entries")
	}
	for k, v := range tags {
		if len(k) < 1 || len(k) > 128 {
			return fieldError(field, k, "Map keys must have length between 1 and 128")
		}
		if strings.HasPrefix(strings.ToLower(k), "aws:") {
			return fieldError(field, k, "Map keys must not start with aws:")
		}
		if len(v) > 256 {
			return fieldError(field+"."+k, nil, "Member must have length less than or equal to 256")
		}
	}
	return nil
}

// validateConfig checks an image's build configuration.
func (s *Server) validateConfig(account string, cfg *store.ImageConfig) error {
	switch {
	case cfg.BaseImageArn == "":
		return fieldError("baseImageArn", nil, "Member must not be null")
	case cfg.BuildRoleArn == "":
		return fieldError("buildRoleArn", nil, "Member must not be null")
	case cfg.CodeArtifact == nil || cfg.CodeArtifact.URI == "":
		return fieldError("codeArtifact", nil, "Member must not be null and must set uri")
	}
	mi, ok := s.managedByARN(cfg.BaseImageArn)
	if !ok {
		return fieldError("baseImageArn", cfg.BaseImageArn, "Member must be the ARN of a managed image (see ListManagedMicrovmImages)")
	}
	if cfg.BaseImageVersion != "" && !slices.ContainsFunc(mi.Versions, func(v ManagedImageVersion) bool { return v.Version == cfg.BaseImageVersion }) {
		return fieldError("baseImageVersion", cfg.BaseImageVersion, "Member must be a version of the managed image (see ListManagedMicrovmImageVersions)")
	}
	if !roleARNRE.MatchString(cfg.BuildRoleArn) {
		return fieldError("buildRoleArn", cfg.BuildRoleArn, "Member must be an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
	}
	if len(cfg.CodeArtifact.URI) > 2048 {
		return fieldError("codeArtifact.uri", nil, "Member must have length less than or equal to 2048")
	}
	if err := s.checkCodeURI(account, cfg.CodeArtifact.URI); err != nil {
		return err
	}
	if len(cfg.Description) > 256 {
		return fieldError("description", nil, "Member must have length less than or equal to 256")
	}
	if err := validateLogging("logging", cfg.Logging); err != nil {
		return err
	}
	if err := s.validateEgressConnectors("egressNetworkConnectors", cfg.EgressNetworkConnectors); err != nil {
		return err
	}
	for i, c := range cfg.CpuConfigurations {
		if c.Architecture != "ARM_64" && c.Architecture != "X86_64" {
			return fieldError(fmt.Sprintf("cpuConfigurations.%d.architecture", i+1), c.Architecture, "Member must satisfy enum value set: [ARM_64, X86_64]")
		}
		// kiln builds and runs on the host's CPU only (no cross-architecture
		// emulation of whole VMs): another architecture is refused rather
		// than quietly built for the host.
		if c.Architecture != s.cfg.Architecture {
			return validation("cpuConfigurations.%d.architecture: this kiln server builds and runs only %s microVMs (its host's architecture), not %s; use [{\"architecture\": \"%s\"}] or omit cpuConfigurations",
				i+1, s.cfg.Architecture, c.Architecture, s.cfg.Architecture)
		}
	}
	for i, r := range cfg.Resources {
		if !slices.Contains(MemorySizesMiB, r.MinimumMemoryInMiB) {
			return fieldError(fmt.Sprintf("resources.%d.minimumMemoryInMiB", i+1), r.MinimumMemoryInMiB, "Member must satisfy enum value set: ["+strings.Join(memoryEnum(), ", ")+"]")
		}
	}
	for i, c := range cfg.AdditionalOsCapabilities {
		if c != "ALL" {
			return fieldError(fmt.Sprintf("additionalOsCapabilities.%d", i+1), c, "Member must satisfy enum value set: [ALL]")
		}
	}
	if err := validateHooks(cfg.Hooks); err != nil {
		return err
	}
	for k, v := range cfg.EnvironmentVariables {
		if !envKeyRE.MatchString(k) {
			return fieldError("environmentVariables", k, "Map keys must have length between 1 and 256 and contain no whitespace or =")
		}
		if len(v) > 4096 {
			return fieldError("environmentVariables."+k, nil, "Member must have length less than or equal to 4096")
		}
	}
	return nil
}

// newBuilds makes the PENDING builds of a version, one per CPU configuration.
func (s *Server) newBuilds(c *call, imgARN, name string, cfg store.ImageConfig) []store.Build {
	archs := []string{}
	for _, cc := range cfg.CpuConfigurations {
		if !slices.Contains(archs, cc.Architecture) {
			archs = append(archs, cc.Architecture)
		}
	}
	if len(archs) == 0 {
		archs = []string{s.cfg.Architecture}
	}
	now := s.cfg.Now().UTC()
	var out []store.Build
	for _, a := range archs {
		out = append(out, store.Build{Account: c.account, ImageName: name, ImageARN: imgARN, ID: newBuildID(), State: store.BuildPending,
			Architecture: a, Chipset: "GENERIC", ChipsetGeneration: "1", CreatedAt: now, UpdatedAt: now})
	}
	return out
}

func (s *Server) startBuild(ctx context.Context, v store.ImageVersion, builds []store.Build) {
	if err := s.be.BuildImage(ctx, v, builds); err != nil {
		slog.Error("backend refused to build image", "image", v.ImageName, "version", v.Version, "err", err)
		bg := context.WithoutCancel(ctx)
		for _, b := range builds {
			s.rep.BuildFinished(bg, b, false, "BuildRejected: "+err.Error(), nil)
		}
	}
}

func (s *Server) createImage(ctx context.Context, c *call) (any, error) {
	var in imageInput
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	if in.Name == "" {
		return nil, fieldError("name", nil, "Member must not be null")
	}
	if !imageNameRE.MatchString(in.Name) {
		return nil, fieldError("name", in.Name, "Member must satisfy regular expression pattern: [a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
	}
	if err := s.validateConfig(c.account, &in.ImageConfig); err != nil {
		return nil, err
	}
	if err := validateTags("tags", in.Tags); err != nil {
		return nil, err
	}
	hashed := in
	hashed.ClientToken = ""
	tok, prev, err := s.clientToken(ctx, c, "CreateMicrovmImage", in.ClientToken, hashed)
	if err != nil {
		return nil, err
	}
	if prev != "" {
		return s.imageVersionResult(ctx, c, prev, true)
	}
	now := s.cfg.Now().UTC()
	arn := s.arn(c.account, kindImage, in.Name)
	first := store.VersionName(1)
	img := store.Image{Account: c.account, Name: in.Name, ARN: arn, State: store.ImageCreating, LatestVersion: first, CreatedAt: now, UpdatedAt: now}
	v := store.ImageVersion{Account: c.account, ImageName: in.Name, ImageARN: arn, Version: first, State: store.VersionPending,
		Status: store.VersionActive, Config: in.ImageConfig, CreatedAt: now, UpdatedAt: now}
	builds := s.newBuilds(c, arn, in.Name, in.ImageConfig)
	for i := range builds {
		builds[i].Version = first
	}
	if tok != nil {
		tok.ResourceID = in.Name + ":" + first
	}
	if err := s.claimUpload(ctx, c.account, in.ImageConfig.CodeArtifact); err != nil {
		return nil, err
	}
	adm, err := s.admission(ctx, c.account)
	if err != nil {
		return nil, err
	}
	release := s.holdReferences()
	err = s.st.CreateImageWithinQuota(ctx, img, v, builds, tok, adm)
	release()
	if err != nil {
		if errors.Is(err, errdefs.ErrExhausted) {
			return nil, toAPIError(err, kindImage, arn)
		}
		if errors.Is(err, errdefs.ErrConflict) {
			if tok != nil {
				if t, e := s.st.GetClientToken(ctx, c.account, "CreateMicrovmImage", in.ClientToken); e == nil && t.InputHash == tok.InputHash {
					return s.imageVersionResult(ctx, c, t.ResourceID, true)
				}
			}
			return nil, conflict(kindImage, arn, "image %s already exists", in.Name)
		}
		return nil, err
	}
	if len(in.Tags) > 0 {
		if err := s.st.TagResource(ctx, c.account, arn, in.Tags); err != nil {
			return nil, err
		}
	}
	s.startBuild(ctx, v, builds)
	return configView(img, v, in.Tags), nil
}

// imageVersionResult answers a repeated idempotent Create/Update with the
// current state of the version it made ("name:version").
func (s *Server) imageVersionResult(ctx context.Context, c *call, ref string, withTags bool) (any, error) {
	name, version, _ := strings.Cut(ref, ":")
	img, err := s.st.GetImage(ctx, c.account, name)
	if err != nil {
		return nil, toAPIError(err, kindImage, name)
	}
	v, err := s.st.GetImageVersion(ctx, c.account, name, version)
	if err != nil {
		return nil, toAPIError(err, "microvm-image-version", ref)
	}
	var tags map[string]string
	if withTags {
		if tags, err = s.st.GetTags(ctx, c.account, img.ARN); err != nil {
			return nil, err
		}
	}
	return configView(img, v, tags), nil
}

func (s *Server) image(ctx context.Context, c *call) (store.Image, error) {
	ident := c.path("imageIdentifier")
	name, err := resolve(c, kindImage, "imageIdentifier", ident)
	if err != nil {
		return store.Image{}, err
	}
	img, err := s.st.GetImage(ctx, c.account, name)
	if err != nil {
		return img, toAPIError(err, kindImage, ident)
	}
	return img, nil
}

func (s *Server) getImage(ctx context.Context, c *call) (any, error) {
	img, err := s.image(ctx, c)
	if err != nil {
		return nil, err
	}
	tags, err := s.st.GetTags(ctx, c.account, img.ARN)
	if err != nil {
		return nil, err
	}
	if len(tags) == 0 {
		tags = nil
	}
	return imageOut{ImageArn: img.ARN, Name: img.Name, State: img.State, CreatedAt: ts(img.CreatedAt), UpdatedAt: ts(img.UpdatedAt),
		LatestActiveImageVersion: img.LatestActiveVersion, LatestFailedImageVersion: img.LatestFailedVersion, Tags: tags}, nil
}

type imageSummary struct {
	ImageArn                 string `json:"imageArn"`
	Name                     string `json:"name"`
	State                    string `json:"state"`
	CreatedAt                *epoch `json:"createdAt"`
	LatestActiveImageVersion string `json:"latestActiveImageVersion,omitempty"`
	LatestFailedImageVersion string `json:"latestFailedImageVersion,omitempty"`
}

func (s *Server) listImages(ctx context.Context, c *call) (any, error) {
	p, err := pageOf(c, 50)
	if err != nil {
		return nil, err
	}
	imgs, next, err := s.st.ListImages(ctx, c.account, c.r.URL.Query().Get("nameFilter"), p)
	if err != nil {
		return nil, err
	}
	out := listOut[imageSummary]{Items: make([]imageSummary, 0, len(imgs)), NextToken: next}
	for _, img := range imgs {
		out.Items = append(out.Items, imageSummary{ImageArn: img.ARN, Name: img.Name, State: img.State, CreatedAt: ts(img.CreatedAt),
			LatestActiveImageVersion: img.LatestActiveVersion, LatestFailedImageVersion: img.LatestFailedVersion})
	}
	return out, nil
}

func building(state string) bool {
	return state == store.ImageCreating || state == store.ImageUpdating
}

func (s *Server) updateImage(ctx context.Context, c *call) (any, error) {
	var in imageInput
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	img, err := s.image(ctx, c)
	if err != nil {
		return nil, err
	}
	if err := s.validateConfig(c.account, &in.ImageConfig); err != nil {
		return nil, err
	}
	hashed := in
	hashed.ClientToken, hashed.Name = "", img.Name
	tok, prev, err := s.clientToken(ctx, c, "UpdateMicrovmImage", in.ClientToken, hashed)
	if err != nil {
		return nil, err
	}
	if prev != "" {
		return s.imageVersionResult(ctx, c, prev, false)
	}
	if building(img.State) {
		return nil, conflict(kindImage, img.ARN, "image %s is %s; wait for the current build to finish", img.Name, img.State)
	}
	now := s.cfg.Now().UTC()
	v := store.ImageVersion{Account: c.account, ImageName: img.Name, ImageARN: img.ARN, State: store.VersionPending,
		Status: store.VersionActive, Config: in.ImageConfig, CreatedAt: now, UpdatedAt: now}
	if err := s.claimUpload(ctx, c.account, in.ImageConfig.CodeArtifact); err != nil {
		return nil, err
	}
	adm, err := s.admission(ctx, c.account)
	if err != nil {
		return nil, err
	}
	release := s.holdReferences()
	v, builds, err := s.st.CreateImageVersionWithinQuota(ctx, v, s.newBuilds(c, img.ARN, img.Name, in.ImageConfig), tok, adm)
	release()
	if err != nil {
		if tok != nil && errors.Is(err, errdefs.ErrConflict) {
			if t, e := s.st.GetClientToken(ctx, c.account, "UpdateMicrovmImage", in.ClientToken); e == nil && t.InputHash == tok.InputHash {
				return s.imageVersionResult(ctx, c, t.ResourceID, false)
			}
		}
		return nil, toAPIError(err, kindImage, img.ARN)
	}
	img.State, img.LatestVersion, img.UpdatedAt = store.ImageUpdating, v.Version, now
	s.startBuild(ctx, v, builds)
	return configView(img, v, nil), nil
}

func (s *Server) deleteImage(ctx context.Context, c *call) (any, error) {
	img, err := s.image(ctx, c)
	if err != nil {
		return nil, err
	}
	// A build in flight is cancelled: the backend's DeleteImageVersion
	// stops it before it frees the version's files.
	versions, _, err := s.st.ListImageVersions(ctx, c.account, img.Name, store.Page{Limit: 1000})
	if err != nil {
		return nil, err
	}
	if err := s.st.DeleteImage(ctx, c.account, img.Name); err != nil {
		return nil, toAPIError(err, kindImage, img.ARN)
	}
	for _, v := range versions {
		if err := s.be.DeleteImageVersion(ctx, c.account, img.Name, v.Version); err != nil {
			slog.Warn("freeing image version", "image", img.Name, "version", v.Version, "err", err)
		}
	}
	return map[string]string{"imageIdentifier": c.path("imageIdentifier"), "state": store.ImageDeleted}, nil
}

// getVersion reads a version by any of its names (store.VersionAliases),
// so "1" and "1.0" both find it.
func (s *Server) getVersion(ctx context.Context, account, image, version string) (store.ImageVersion, error) {
	var err error
	for _, name := range store.VersionAliases(version) {
		var v store.ImageVersion
		if v, err = s.st.GetImageVersion(ctx, account, image, name); !errors.Is(err, errdefs.ErrNotFound) {
			return v, err
		}
	}
	return store.ImageVersion{}, err
}

func (s *Server) version(ctx context.Context, c *call) (store.Image, store.ImageVersion, error) {
	img, err := s.image(ctx, c)
	if err != nil {
		return img, store.ImageVersion{}, err
	}
	ver := c.path("imageVersion")
	v, err := s.getVersion(ctx, c.account, img.Name, ver)
	if err != nil {
		return img, v, toAPIError(err, "microvm-image-version", img.Name+":"+ver)
	}
	return img, v, nil
}

func (s *Server) getImageVersion(ctx context.Context, c *call) (any, error) {
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	tags, err := s.st.GetTags(ctx, c.account, img.ARN)
	if err != nil {
		return nil, err
	}
	if len(tags) == 0 {
		tags = nil
	}
	return versionView(v, tags), nil
}

func (s *Server) listImageVersions(ctx context.Context, c *call) (any, error) {
	img, err := s.image(ctx, c)
	if err != nil {
		return nil, err
	}
	p, err := pageOf(c, 50)
	if err != nil {
		return nil, err
	}
	vs, next, err := s.st.ListImageVersions(ctx, c.account, img.Name, p)
	if err != nil {
		return nil, err
	}
	out := listOut[versionOut]{Items: make([]versionOut, 0, len(vs)), NextToken: next}
	for _, v := range vs {
		out.Items = append(out.Items, versionView(v, nil))
	}
	return out, nil
}

// refreshLatestActive points the image at its newest SUCCESSFUL, ACTIVE
// version (or none) after a version was deactivated or deleted.
func (s *Server) updateImageVersion(ctx context.Context, c *call) (any, error) {
	var in struct {
		Status string `json:"status"`
	}
	if err := decode(c, &in); err != nil {
		return nil, err
	}
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	if in.Status != store.VersionActive && in.Status != store.VersionInactive {
		return nil, fieldError("status", in.Status, "Member must satisfy enum value set: [ACTIVE, INACTIVE]")
	}
	v.Status = in.Status
	v.UpdatedAt = s.cfg.Now().UTC()
	// The store recomputes the image's latest active version in the same
	// transaction, from what is stored then.
	if err := s.st.UpdateImageVersion(ctx, v); err != nil {
		return nil, toAPIError(err, "microvm-image-version", img.Name+":"+v.Version)
	}
	return versionView(v, nil), nil
}

func (s *Server) deleteImageVersion(ctx context.Context, c *call) (any, error) {
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	// A version still building is cancelled: its records go now (the store
	// fails the image that was building it and moves its latest active
	// version in the same transaction), and the backend stops the build
	// (VMs, mounts, files) before freeing it.
	if err := s.st.DeleteImageVersion(ctx, c.account, img.Name, v.Version); err != nil {
		return nil, toAPIError(err, "microvm-image-version", img.Name+":"+v.Version)
	}
	if err := s.be.DeleteImageVersion(ctx, c.account, img.Name, v.Version); err != nil {
		slog.Warn("freeing image version", "image", img.Name, "version", v.Version, "err", err)
	}
	return map[string]string{"imageIdentifier": c.path("imageIdentifier"), "imageVersion": v.Version, "state": store.VersionDeleted}, nil
}

func (s *Server) getBuild(ctx context.Context, c *call) (any, error) {
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	id := c.path("buildId")
	b, err := s.st.GetBuild(ctx, c.account, img.Name, v.Version, id)
	if err != nil {
		return nil, toAPIError(err, "microvm-image-build", id)
	}
	return buildView(b), nil
}

func (s *Server) listBuilds(ctx context.Context, c *call) (any, error) {
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	p, err := pageOf(c, 50)
	if err != nil {
		return nil, err
	}
	// Filter before paging (as AWS does): a page is short only when no
	// nextToken follows. Each store call asks for no more than the page
	// still needs, so its nextToken is exactly where this page stops.
	q := c.r.URL.Query()
	arch, chip, gen := q.Get("architecture"), q.Get("chipset"), q.Get("chipsetGeneration")
	out := listOut[buildOut]{Items: []buildOut{}}
	want := p.Limit
	for range 1000 { // bounded: a version has few builds
		p.Limit = want - len(out.Items)
		bs, next, err := s.st.ListBuilds(ctx, c.account, img.Name, v.Version, p)
		if err != nil {
			return nil, err
		}
		for _, b := range bs {
			if (arch != "" && arch != b.Architecture) || (chip != "" && chip != b.Chipset) || (gen != "" && gen != b.ChipsetGeneration) {
				continue
			}
			out.Items = append(out.Items, buildView(b))
		}
		out.NextToken = next
		if next == "" || len(out.Items) >= want {
			break
		}
		p.Token = next
	}
	return out, nil
}

// getBuildLog is a kiln extension: a build's log from ?offset= (bytes),
// at most 1 MiB per call, for `kiln logs` and `--wait`.
func (s *Server) getBuildLog(ctx context.Context, c *call) (any, error) {
	img, v, err := s.version(ctx, c)
	if err != nil {
		return nil, err
	}
	id := c.path("buildId")
	b, err := s.st.GetBuild(ctx, c.account, img.Name, v.Version, id)
	if err != nil {
		return nil, toAPIError(err, "microvm-image-build", id)
	}
	var off int64
	if o := c.r.URL.Query().Get("offset"); o != "" {
		if off, err = strconv.ParseInt(o, 10, 64); err != nil || off < 0 {
			return nil, fieldError("offset", o, "Member must be a non-negative integer")
		}
	}
	data, err := s.st.ReadBuildLog(ctx, b.ID, off, 1<<20)
	if err != nil {
		return nil, err
	}
	return map[string]any{"buildId": b.ID, "buildState": b.State, "log": string(data), "nextOffset": off + int64(len(data))}, nil
}
