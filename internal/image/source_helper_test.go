//go:build linux

package image

import "github.com/kiln-sandbox/kiln/internal/image/source"

func sourceConfigLocal() source.Config { return source.Config{AllowLocal: true} }
