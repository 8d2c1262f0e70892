// Package awscli is kiln's client side of the AWS Lambda MicroVMs API: a
// SigV4-signing HTTP client and the table of operations that the CLI turns
// into `kiln <operation>` commands mirroring `aws lambda-microvms`.
package awscli

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"

	"github.com/kiln-sandbox/kiln/internal/auth"
)

// Client sends signed requests to a kiln (or AWS) endpoint.
type Client struct {
	Endpoint string // e.g. http://127.0.0.1:9090
	Region   string
	Creds    auth.Credentials
	HTTP     *http.Client
	signer   *v4.Signer
}

// NewClient returns a client for endpoint.
func NewClient(endpoint, region string, creds auth.Credentials) *Client {
	return &Client{
		Endpoint: strings.TrimSuffix(endpoint, "/"),
		Region:   region,
		Creds:    creds,
		HTTP:     &http.Client{Timeout: 60 * time.Second},
		signer:   v4.NewSigner(),
	}
}

// APIError is an error answer of the API.
type APIError struct {
	Status  int
	Type    string
	Message string
	Body    []byte
}

func (e *APIError) Error() string {
	return fmt.Sprintf("%s (HTTP %d): %s", e.Type, e.Status, e.Message)
}

// Do sends method path?query with body (nil for none) and returns the
// response body of a 2xx answer, or an *APIError.
func (c *Client) Do(ctx context.Context, method, path string, query url.Values, body []byte) ([]byte, error) {
	u := c.Endpoint + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	} else {
		req.Body, req.ContentLength = http.NoBody, 0
	}
	if c.Creds.SessionToken != "" {
		req.Header.Set("X-Amz-Security-Token", c.Creds.SessionToken)
	}
	if len(body) > 64<<10 {
		// kiln authenticates a large body from its headers before reading
		// it, with the hash signed here (as S3 does).
		sum := sha256.Sum256(body)
		req.Header.Set("X-Amz-Content-Sha256", hex.EncodeToString(sum[:]))
	}
	if err := auth.SignRequest(ctx, c.signer, req, body, c.Creds.AccessKeyID, c.Creds.SecretAccessKey, "lambda", c.Region, time.Now()); err != nil {
		return nil, err
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("calling %s: %w", c.Endpoint, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("reading response: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		e := &APIError{Status: resp.StatusCode, Type: resp.Header.Get("X-Amzn-Errortype"), Body: data}
		var m struct {
			Message string `json:"message"`
		}
		json.Unmarshal(data, &m)
		e.Message = m.Message
		if i := strings.IndexByte(e.Type, ':'); i >= 0 {
			e.Type = e.Type[:i]
		}
		return nil, e
	}
	return data, nil
}

// Upload sends a code package (a zip of size bytes with hex SHA-256 hash)
// to the server's artifact store and returns the codeArtifact URI to use.
// The hash is signed, so the server checks the signature before storing
// anything and the bytes against the hash afterwards.
func (c *Client) Upload(ctx context.Context, body io.Reader, size int64, hash string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, "PUT", c.Endpoint+"/kiln/v1/code-artifacts", body)
	if err != nil {
		return "", fmt.Errorf("building upload: %w", err)
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/zip")
	req.Header.Set("X-Amz-Content-Sha256", hash)
	if err := auth.SignRequestHash(ctx, c.signer, req, hash, c.Creds.AccessKeyID, c.Creds.SecretAccessKey, "lambda", c.Region, time.Now()); err != nil {
		return "", err
	}
	hc := *c.HTTP
	hc.Timeout = 0 // large packages; ctx bounds the upload
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("uploading to %s: %w", c.Endpoint, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("reading upload answer: %w", err)
	}
	if resp.StatusCode != http.StatusCreated {
		e := &APIError{Status: resp.StatusCode, Type: resp.Header.Get("X-Amzn-Errortype"), Body: data}
		var m struct {
			Message string `json:"message"`
		}
		json.Unmarshal(data, &m)
		e.Message = m.Message
		return "", e
	}
	var out struct {
		URI string `json:"uri"`
	}
	if err := json.Unmarshal(data, &out); err != nil || out.URI == "" {
		return "", fmt.Errorf("upload answer has no uri: %s", data)
	}
	return out.URI, nil
}
