package source

import (
	"context"
	"fmt"
	"io"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3Config names an S3-compatible object store. kiln is self-hosted, so
// the endpoint is always explicit and path-style addressing is the
// default (MinIO, Ceph RGW, Garage and SeaweedFS all accept it).
type S3Config struct {
	Endpoint        string // e.g. http://127.0.0.1:9000
	Region          string // "" = us-east-1
	AccessKeyID     string
	SecretAccessKey string
	SessionToken    string
	// VirtualHosted switches to bucket.host addressing.
	VirtualHosted bool
}

// NewS3Client builds the SDK client for cfg.
func NewS3Client(cfg S3Config) *s3.Client {
	region := cfg.Region
	if region == "" {
		region = "us-east-1"
	}
	return s3.New(s3.Options{
		Region:       region,
		BaseEndpoint: aws.String(cfg.Endpoint),
		UsePathStyle: !cfg.VirtualHosted,
		Credentials:  credentials.NewStaticCredentialsProvider(cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken),
	})
}

func downloadS3(ctx context.Context, cfg S3Config, bucket, key string, w io.Writer, max int64) error {
	out, err := NewS3Client(cfg).GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(bucket), Key: aws.String(key)})
	if err != nil {
		return fmt.Errorf("s3://%s/%s: %w", bucket, key, err)
	}
	defer out.Body.Close()
	return copyBounded(w, out.Body, aws.ToInt64(out.ContentLength), max)
}
