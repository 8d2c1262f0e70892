package source

import (
	"context"
	"fmt"
	"io"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3Config names an S3-compatible object store. An empty Endpoint means
// AWS's own S3 in Region; a self-hosted store (MinIO, Ceph RGW, Garage,
// SeaweedFS, versitygw) is named by its Endpoint and usually wants
// path-style addressing, which is the default.
type S3Config struct {
	Endpoint        string // e.g. http://127.0.0.1:9000; "" = AWS S3
	Region          string // "" = us-east-1
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	// Credentials, when set, is used instead of the static keys above
	// (the standard AWS chain: environment, shared files, SSO, IMDS).
	Credentials aws.CredentialsProvider
	// VirtualHosted switches to bucket.host addressing.
	VirtualHosted bool
}

// S3FromEnvironment is the S3 configuration of `kiln server`: the endpoint,
// region and addressing the operator chose, with credentials from the
// standard AWS chain (AWS_ACCESS_KEY_ID..., AWS_PROFILE and the shared
// files, SSO, web identity, the host's own IMDS), resolved lazily at the
// first s3:// fetch so that a server without S3 credentials still starts.
// region "" takes the chain's region (AWS_REGION, the profile), then
// fallbackRegion.
func S3FromEnvironment(ctx context.Context, endpoint, region, fallbackRegion string, pathStyle bool) (*S3Config, error) {
	opts := []func(*config.LoadOptions) error{}
	if region != "" {
		opts = append(opts, config.WithRegion(region))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("loading the AWS configuration for s3:// code artifacts: %w", err)
	}
	if awsCfg.Region == "" {
		awsCfg.Region = fallbackRegion
	}
	return &S3Config{Endpoint: endpoint, Region: awsCfg.Region, Credentials: awsCfg.Credentials, VirtualHosted: !pathStyle}, nil
}

// NewS3Client builds the SDK client for cfg.
func NewS3Client(cfg S3Config) *s3.Client {
	region := cfg.Region
	if region == "" {
		region = "us-east-1"
	}
	creds := cfg.Credentials
	if creds == nil {
		creds = credentials.NewStaticCredentialsProvider(cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken)
	}
	o := s3.Options{
		Region:       region,
		UsePathStyle: !cfg.VirtualHosted,
		Credentials:  creds,
	}
	if cfg.Endpoint != "" {
		o.BaseEndpoint = aws.String(cfg.Endpoint)
	}
	return s3.New(o)
}

func downloadS3(ctx context.Context, cfg S3Config, bucket, key string, w io.Writer, max int64) error {
	out, err := NewS3Client(cfg).GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return fmt.Errorf("s3://%s/%s: %w", bucket, key, err)
	}
	defer out.Body.Close()
	return copyBounded(w, out.Body, aws.ToInt64(out.ContentLength), max)
}
