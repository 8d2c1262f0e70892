package auth

import (
	"bufio"
	"crypto/rand"
	"encoding/base32"
	"encoding/base64"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/store"
)

// NewAccessKey makes a fresh key for account. Ids look like AWS's (20
// upper-case characters starting with AKIA) so tools that check the shape
// accept them; secrets are 40 characters from 30 random bytes.
func NewAccessKey(account, description string) (store.AccessKey, error) {
	id := make([]byte, 10)
	sec := make([]byte, 30)
	if _, err := rand.Read(id); err != nil {
		return store.AccessKey{}, fmt.Errorf("generating key id: %w", err)
	}
	if _, err := rand.Read(sec); err != nil {
		return store.AccessKey{}, fmt.Errorf("generating secret: %w", err)
	}
	return store.AccessKey{
		ID:          "AKIA" + base32.StdEncoding.EncodeToString(id)[:16],
		Secret:      base64.StdEncoding.EncodeToString(sec),
		Account:     account,
		Description: description,
		CreatedAt:   time.Now().UTC(),
	}, nil
}

// NewAccountID returns a random 12-digit account id.
func NewAccountID() (string, error) {
	n, err := rand.Int(rand.Reader, big.NewInt(1e12))
	if err != nil {
		return "", fmt.Errorf("generating account id: %w", err)
	}
	return fmt.Sprintf("%012d", n.Int64()), nil
}

// WriteCredentials writes k as the [profile] of an AWS shared-credentials
// file at path, mode 0600, replacing the file atomically.
func WriteCredentials(path, profile string, k store.AccessKey) error {
	content := fmt.Sprintf("[%s]\naws_access_key_id = %s\naws_secret_access_key = %s\n", profile, k.ID, k.Secret)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".credentials-*")
	if err != nil {
		return fmt.Errorf("writing credentials: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("writing credentials: %w", err)
	}
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return fmt.Errorf("writing credentials: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing credentials: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing credentials: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing credentials: %w", err)
	}
	return nil
}

// Credentials is what a client reads from a shared-credentials file.
type Credentials struct {
	AccessKeyID, SecretAccessKey, SessionToken string
}

// ReadCredentials reads [profile] of an AWS shared-credentials file.
func ReadCredentials(path, profile string) (Credentials, error) {
	var c Credentials
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("reading credentials: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
			continue
		}
		if strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]") {
			in = strings.TrimSpace(line[1:len(line)-1]) == profile
			continue
		}
		if !in {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "aws_access_key_id":
			c.AccessKeyID = strings.TrimSpace(v)
		case "aws_secret_access_key":
			c.SecretAccessKey = strings.TrimSpace(v)
		case "aws_session_token":
			c.SessionToken = strings.TrimSpace(v)
		}
	}
	if err := sc.Err(); err != nil {
		return c, fmt.Errorf("reading credentials: %w", err)
	}
	if c.AccessKeyID == "" || c.SecretAccessKey == "" {
		return c, fmt.Errorf("profile %q not found in %s", profile, path)
	}
	return c, nil
}
