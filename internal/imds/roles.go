package imds

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/sts"

	"github.com/kiln-sandbox/kiln/internal/errdefs"
)

// Roles is the operator's roles file (`kiln server --roles-file`): for
// each execution role ARN a tenant may name, where its credentials come
// from. kiln has no IAM: the file is the whole trust policy. A VM whose
// role is not in the file, or belongs to another account than the VM's,
// gets no credentials (404), as an instance without a profile.
//
//	{"roles": {
//	  "arn:aws:iam::123456789012:role/app": {"profile": "app"},
//	  "arn:aws:iam::123456789012:role/etl": {"assumeRole": {
//	     "roleArn": "arn:aws:iam::123456789012:role/etl", "endpoint": "https://sts.internal:8443",
//	     "region": "us-east-1", "sourceProfile": "kiln", "durationSeconds": 3600}}}}
//
// "profile" names a profile of the host's AWS configuration (AWS_CONFIG_FILE
// and AWS_SHARED_CREDENTIALS_FILE as for the AWS CLI); "assumeRole" calls
// STS AssumeRole (on endpoint, for an STS-compatible service; "" = AWS's)
// with the sourceProfile's credentials (""= the default chain).
type Roles struct {
	Roles map[string]RoleSource `json:"roles"`
}

// RoleSource is one role's credentials source: exactly one field is set.
type RoleSource struct {
	Profile    string      `json:"profile,omitempty"`
	AssumeRole *AssumeRole `json:"assumeRole,omitempty"`
}

// AssumeRole configures an STS AssumeRole call.
type AssumeRole struct {
	RoleARN         string `json:"roleArn"`
	Endpoint        string `json:"endpoint,omitempty"`
	Region          string `json:"region,omitempty"`
	SourceProfile   string `json:"sourceProfile,omitempty"`
	ExternalID      string `json:"externalId,omitempty"`
	DurationSeconds int    `json:"durationSeconds,omitempty"`
}

var roleARNRE = regexp.MustCompile(`^arn:aws[a-zA-Z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$`)

// maxRolesFile bounds the roles file.
const maxRolesFile = 1 << 20

// ParseRoles reads a roles file's bytes, refusing unknown fields and
// incomplete entries so that a typo is an error at start, not a VM
// without credentials later.
func ParseRoles(b []byte) (*Roles, error) {
	if len(b) > maxRolesFile {
		return nil, fmt.Errorf("%w: roles file is larger than %d bytes", errdefs.ErrInvalid, maxRolesFile)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	var r Roles
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("%w: roles file: %v", errdefs.ErrInvalid, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: roles file: data after the JSON object", errdefs.ErrInvalid)
	}
	for arn, s := range r.Roles {
		if !roleARNRE.MatchString(arn) {
			return nil, fmt.Errorf("%w: roles file: %q is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)", errdefs.ErrInvalid, arn)
		}
		switch {
		case (s.Profile == "") == (s.AssumeRole == nil):
			return nil, fmt.Errorf("%w: roles file: %s: give exactly one of profile and assumeRole", errdefs.ErrInvalid, arn)
		case s.AssumeRole != nil && !roleARNRE.MatchString(s.AssumeRole.RoleARN):
			return nil, fmt.Errorf("%w: roles file: %s: assumeRole.roleArn %q is not an IAM role ARN", errdefs.ErrInvalid, arn, s.AssumeRole.RoleARN)
		case s.AssumeRole != nil && s.AssumeRole.DurationSeconds != 0 && (s.AssumeRole.DurationSeconds < 900 || s.AssumeRole.DurationSeconds > 43200):
			return nil, fmt.Errorf("%w: roles file: %s: assumeRole.durationSeconds must be 900..43200", errdefs.ErrInvalid, arn)
		}
	}
	return &r, nil
}

// LoadRoles reads and parses the roles file at path.
func LoadRoles(path string) (*Roles, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("roles file: %w", err)
	}
	defer f.Close()
	b := make([]byte, maxRolesFile+1)
	n, _ := f.Read(b)
	for n < len(b) {
		m, err := f.Read(b[n:])
		n += m
		if err != nil {
			break
		}
	}
	return ParseRoles(b[:n])
}

// AccountOf is the account of an IAM role ARN ("" if malformed).
func AccountOf(roleARN string) string {
	parts := strings.SplitN(roleARN, ":", 6)
	if len(parts) != 6 {
		return ""
	}
	return parts[4]
}

// Providers builds one cached credentials provider per role: profiles and
// STS sessions are resolved on first use and refreshed before they
// expire, shared by all VMs of the role.
func (r *Roles) Providers(ctx context.Context) (map[string]aws.CredentialsProvider, error) {
	out := make(map[string]aws.CredentialsProvider, len(r.Roles))
	for arn, s := range r.Roles {
		p, err := s.provider(ctx)
		if err != nil {
			return nil, fmt.Errorf("roles file: %s: %w", arn, err)
		}
		out[arn] = aws.NewCredentialsCache(p, func(o *aws.CredentialsCacheOptions) { o.ExpiryWindow = 5 * time.Minute })
	}
	return out, nil
}

func (s RoleSource) provider(ctx context.Context) (aws.CredentialsProvider, error) {
	if s.Profile != "" {
		cfg, err := config.LoadDefaultConfig(ctx, config.WithSharedConfigProfile(s.Profile))
		if err != nil {
			return nil, fmt.Errorf("profile %s: %w", s.Profile, err)
		}
		return cfg.Credentials, nil
	}
	a := s.AssumeRole
	opts := []func(*config.LoadOptions) error{}
	if a.SourceProfile != "" {
		opts = append(opts, config.WithSharedConfigProfile(a.SourceProfile))
	}
	if a.Region != "" {
		opts = append(opts, config.WithRegion(a.Region))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("assumeRole source: %w", err)
	}
	if cfg.Region == "" {
		cfg.Region = "us-east-1"
	}
	client := sts.NewFromConfig(cfg, func(o *sts.Options) {
		if a.Endpoint != "" {
			o.BaseEndpoint = aws.String(a.Endpoint)
		}
	})
	return stscreds.NewAssumeRoleProvider(client, a.RoleARN, func(o *stscreds.AssumeRoleOptions) {
		o.RoleSessionName = "kiln-microvm"
		if a.ExternalID != "" {
			o.ExternalID = aws.String(a.ExternalID)
		}
		if a.DurationSeconds != 0 {
			o.Duration = time.Duration(a.DurationSeconds) * time.Second
		}
	}), nil
}
