package awscli

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// UploadCode packages src (a folder, zipped here, or a .zip file) and
// uploads it with c, returning the codeArtifact URI.
func UploadCode(ctx context.Context, c *Client, src string) (string, error) {
	info, err := os.Stat(src)
	if err != nil {
		return "", fmt.Errorf("reading --code: %w", err)
	}
	var f *os.File
	switch {
	case info.IsDir():
		if f, err = os.CreateTemp("", "kiln-code-*.zip"); err != nil {
			return "", fmt.Errorf("packaging code: %w", err)
		}
		defer os.Remove(f.Name())
		if err := ZipDir(src, f); err != nil {
			f.Close()
			return "", err
		}
	case strings.HasSuffix(src, ".zip"):
		if f, err = os.Open(src); err != nil {
			return "", fmt.Errorf("reading --code: %w", err)
		}
	default:
		return "", fmt.Errorf("--code must be a folder or a .zip file")
	}
	defer f.Close()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	h := sha256.New()
	size, err := io.Copy(h, f)
	if err != nil {
		return "", fmt.Errorf("hashing code: %w", err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return "", err
	}
	return c.Upload(ctx, f, size, hex.EncodeToString(h.Sum(nil)))
}

// ZipDir writes the regular files and folders under root to w as a zip.
// Times are fixed so the same content gives the same bytes (and digest).
func ZipDir(root string, w io.Writer) error {
	zw := zip.NewWriter(w)
	epoch := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil || rel == "." {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		hdr, err := zip.FileInfoHeader(info)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		hdr.Modified = epoch
		if d.IsDir() {
			hdr.Name += "/"
			_, err = zw.CreateHeader(hdr)
			return err
		}
		if !info.Mode().IsRegular() {
			return nil // sockets, devices and links stay out of the package
		}
		hdr.Method = zip.Deflate
		fw, err := zw.CreateHeader(hdr)
		if err != nil {
			return err
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = io.Copy(fw, f)
		return err
	})
	if err != nil {
		return fmt.Errorf("zipping %s: %w", root, err)
	}
	return zw.Close()
}

// WriteCodePackage writes a code package at path: a zip holding dockerfile
// as Dockerfile and, under each name, the file at files[name] (keeping its
// mode, so executables stay executable).
func WriteCodePackage(path, dockerfile string, files map[string]string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	zw := zip.NewWriter(f)
	w, err := zw.Create("Dockerfile")
	if err != nil {
		return err
	}
	if _, err := io.WriteString(w, dockerfile); err != nil {
		return err
	}
	for name, src := range files {
		fi, err := os.Stat(src)
		if err != nil {
			return err
		}
		h, err := zip.FileInfoHeader(fi) // keeps the executable bit
		if err != nil {
			return err
		}
		h.Name, h.Method = name, zip.Deflate
		w, err := zw.CreateHeader(h)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	if err := zw.Close(); err != nil {
		return err
	}
	return f.Close()
}
