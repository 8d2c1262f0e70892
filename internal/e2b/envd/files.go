package envd

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime"
	"mime/multipart"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/kiln-sandbox/kiln/internal/agent/proto"
)

// Bounds of file transfers. An upload is held in memory to learn its size
// (a tar header needs it) unless it is a raw body with a Content-Length.
const (
	maxUploadFile  = 32 << 20
	maxUploadParts = 64
	maxFileBytes   = 4 << 30
	transferLimit  = 10 * time.Minute
)

// httpError is envd's HTTP error body (its OpenAPI Error schema).
func httpError(w http.ResponseWriter, e *rpcError) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Code.httpStatus())
	json.NewEncoder(w).Encode(map[string]any{"code": e.Code.httpStatus(), "message": e.Message})
}

// filePath reads and checks a path parameter, relative to user's home.
func filePath(p, user string) (string, *rpcError) {
	if p == "" {
		return "", errf(codeInvalidArgument, "path is required")
	}
	if len(p) > 4096 || strings.ContainsRune(p, 0) {
		return "", errf(codeInvalidArgument, "path is longer than 4096 bytes or holds a NUL byte")
	}
	p = resolvePath(p, homeOf(user))
	if p == "/" {
		return "", errf(codeInvalidArgument, "path / is a directory")
	}
	return p, nil
}

// download is GET /files?path=: the file's bytes.
func (h *Handler) download(w http.ResponseWriter, r *http.Request) {
	user, e := h.callUser(r)
	if e != nil {
		httpError(w, e)
		return
	}
	p, e := filePath(r.URL.Query().Get("path"), user)
	if e != nil {
		httpError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), transferLimit)
	defer cancel()
	a, _, _, e := h.agent(ctx)
	if e != nil {
		httpError(w, e)
		return
	}
	pr, pw := io.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		pw.CloseWithError(a.CopyOutAs(ctx, p, user, pw))
	}()
	defer func() { pr.CloseWithError(errors.New("download ended")); cancel(); <-done }()
	size, body, e := fileFromTar(pr, path.Base(p))
	if e != nil {
		httpError(w, e)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": path.Base(p)}))
	http.NewResponseController(w).SetWriteDeadline(time.Time{})
	io.Copy(w, body)
}

// fileFromTar reads the tar stream of a copy-out of one path, which the
// guest wrote: its first entry must be the regular file named base, of a
// size within bounds; the returned reader yields exactly its bytes.
func fileFromTar(r io.Reader, base string) (int64, io.Reader, *rpcError) {
	tr := tar.NewReader(r)
	hdr, err := tr.Next()
	if err != nil {
		return 0, nil, classify(fmt.Errorf("reading %s: %w", base, err))
	}
	switch {
	case hdr.Typeflag == tar.TypeDir:
		return 0, nil, errf(codeInvalidArgument, "%s is a directory: list it instead", base)
	case hdr.Typeflag == tar.TypeSymlink:
		return 0, nil, errf(codeInvalidArgument, "%s is a symbolic link (to %q): read its target", base, hdr.Linkname)
	case hdr.Typeflag != tar.TypeReg:
		return 0, nil, errf(codeInvalidArgument, "%s is not a regular file", base)
	case strings.TrimSuffix(hdr.Name, "/") != base:
		return 0, nil, errf(codeInternal, "the guest sent entry %q for %q", hdr.Name, base)
	case hdr.Size < 0 || hdr.Size > maxFileBytes:
		return 0, nil, errf(codeResourceExhaust, "%s has %d bytes; kiln's envd reads files up to %d bytes", base, hdr.Size, int64(maxFileBytes))
	}
	return hdr.Size, io.LimitReader(tr, hdr.Size), nil
}

// writtenEntry is envd's EntryInfo answer to an upload.
type writtenEntry struct {
	Name string `json:"name"`
	Type string `json:"type"`
	Path string `json:"path"`
}

// upload is POST /files: multipart/form-data parts named "file" (each
// written to ?path=, or to its file name when no path is given), or a raw
// application/octet-stream body written to ?path=. Parent directories are
// made; an existing file is replaced. As another user than root, the
// guest writes with that user's permissions and the files are its own.
func (h *Handler) upload(w http.ResponseWriter, r *http.Request) {
	user, e := h.callUser(r)
	if e != nil {
		httpError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), transferLimit)
	defer cancel()
	http.NewResponseController(w).SetReadDeadline(time.Now().Add(transferLimit))
	a, _, _, e := h.agent(ctx)
	if e != nil {
		httpError(w, e)
		return
	}
	write := func(p string, size int64, body io.Reader) *rpcError {
		pr, pw := io.Pipe()
		go func() {
			tw := tar.NewWriter(pw)
			err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: path.Base(p), Size: size, Mode: 0o644, ModTime: time.Now()})
			if err == nil {
				var n int64
				n, err = io.Copy(tw, io.LimitReader(body, size))
				if err == nil && n != size {
					err = fmt.Errorf("body ended after %d of %d bytes", n, size)
				}
			}
			if err == nil {
				err = tw.Close()
			}
			pw.CloseWithError(err)
		}()
		if err := a.CopyInAs(ctx, path.Dir(p), user, pr); err != nil {
			pr.CloseWithError(err)
			return classify(fmt.Errorf("writing %s: %w", p, err))
		}
		return nil
	}
	query := r.URL.Query().Get("path")
	var out []writtenEntry
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	switch {
	case r.Header.Get("Content-Encoding") != "" && r.Header.Get("Content-Encoding") != "identity":
		httpError(w, errf(codeUnimplemented, "kiln's envd does not accept compressed uploads yet"))
		return
	case ct == "application/octet-stream":
		p, e := filePath(query, user)
		if e != nil {
			httpError(w, e)
			return
		}
		if r.ContentLength < 0 || r.ContentLength > maxFileBytes {
			httpError(w, errf(codeInvalidArgument, "a raw upload needs a Content-Length of at most %d bytes", int64(maxFileBytes)))
			return
		}
		if e := write(p, r.ContentLength, r.Body); e != nil {
			httpError(w, e)
			return
		}
		out = append(out, writtenEntry{Name: path.Base(p), Type: "file", Path: p})
	case ct == "multipart/form-data" && params["boundary"] != "":
		mr := multipart.NewReader(r.Body, params["boundary"])
		for i := 0; ; i++ {
			part, err := mr.NextPart()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				httpError(w, errf(codeInvalidArgument, "reading the multipart body: %v", err))
				return
			}
			if i >= maxUploadParts {
				httpError(w, errf(codeInvalidArgument, "at most %d files per upload", maxUploadParts))
				return
			}
			if part.FormName() != "file" {
				part.Close()
				continue
			}
			name := query
			if name == "" {
				// The SDK names each file by its full path; Part.FileName
				// would keep only the last element.
				_, cd, _ := mime.ParseMediaType(part.Header.Get("Content-Disposition"))
				name = cd["filename"]
			}
			p, e := filePath(name, user)
			if e != nil {
				httpError(w, e)
				return
			}
			data, err := io.ReadAll(io.LimitReader(part, maxUploadFile+1))
			if err != nil {
				httpError(w, errf(codeInvalidArgument, "reading %s: %v", name, err))
				return
			}
			if len(data) > maxUploadFile {
				httpError(w, errf(codeResourceExhaust, "%s is over %d bytes: upload it as application/octet-stream (useOctetStream) to stream it", name, maxUploadFile))
				return
			}
			if e := write(p, int64(len(data)), bytes.NewReader(data)); e != nil {
				httpError(w, e)
				return
			}
			out = append(out, writtenEntry{Name: path.Base(p), Type: "file", Path: p})
		}
	default:
		httpError(w, errf(codeInvalidArgument, "content type %q: upload multipart/form-data or application/octet-stream", ct))
		return
	}
	if len(out) == 0 {
		httpError(w, errf(codeInvalidArgument, "no file in the upload"))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(out)
}

// entryInfo is filesystem.EntryInfo in protobuf JSON.
type entryInfo struct {
	Name          string  `json:"name"`
	Type          string  `json:"type"`
	Path          string  `json:"path"`
	Size          string  `json:"size"` // int64: a string in JSON
	Mode          uint32  `json:"mode"`
	Permissions   string  `json:"permissions"`
	Owner         string  `json:"owner"`
	Group         string  `json:"group"`
	ModifiedTime  string  `json:"modifiedTime"`
	SymlinkTarget *string `json:"symlinkTarget,omitempty"`
}

func entryOf(e proto.DirEntry) entryInfo {
	out := entryInfo{Name: e.Name, Path: e.Path, Size: strconv.FormatInt(e.Size, 10), Mode: e.Mode,
		Owner: e.Owner, Group: e.Group, ModifiedTime: e.ModTime.UTC().Format(time.RFC3339Nano)}
	if out.Owner == "" {
		out.Owner = strconv.FormatUint(uint64(e.UID), 10)
	}
	if out.Group == "" {
		out.Group = strconv.FormatUint(uint64(e.GID), 10)
	}
	mode := fs.FileMode(e.Mode & 0o777)
	switch e.Type {
	case proto.FileRegular:
		out.Type = "FILE_TYPE_FILE"
	case proto.FileDir:
		out.Type, mode = "FILE_TYPE_DIRECTORY", mode|fs.ModeDir
	case proto.FileSymlink:
		out.Type, mode = "FILE_TYPE_SYMLINK", mode|fs.ModeSymlink
		t := e.Target
		out.SymlinkTarget = &t
	default:
		out.Type = "FILE_TYPE_UNSPECIFIED"
	}
	out.Permissions = mode.String()
	return out
}

// listDirRequest is filesystem.ListDirRequest.
type listDirRequest struct {
	Path  string `json:"path"`
	Depth uint32 `json:"depth"`
}

func checkListDir(req listDirRequest, user string) (string, int, *rpcError) {
	if req.Path == "" {
		req.Path = homeOf(user)
	}
	if len(req.Path) > 4096 || strings.ContainsRune(req.Path, 0) {
		return "", 0, errf(codeInvalidArgument, "path is longer than 4096 bytes or holds a NUL byte")
	}
	depth := int(req.Depth)
	if depth == 0 {
		depth = 1
	}
	if depth > proto.MaxListDepth {
		return "", 0, errf(codeInvalidArgument, "depth %d is over kiln's limit of %d", req.Depth, proto.MaxListDepth)
	}
	return resolvePath(req.Path, homeOf(user)), depth, nil
}

func (h *Handler) listDir(w http.ResponseWriter, r *http.Request) {
	var req listDirRequest
	if e := readUnary(w, r, &req); e != nil {
		writeUnaryError(w, e)
		return
	}
	user, e := h.callUser(r)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	p, depth, e := checkListDir(req, user)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	a, _, _, e := h.agent(ctx)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	res, err := a.ListDirAs(ctx, p, depth, user)
	if err != nil {
		writeUnaryError(w, classify(err))
		return
	}
	out := make([]entryInfo, 0, len(res.Entries))
	for _, e := range res.Entries {
		out = append(out, entryOf(e))
	}
	writeUnary(w, map[string]any{"entries": out})
}

func (h *Handler) stat(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Path string `json:"path"`
	}
	if e := readUnary(w, r, &req); e != nil {
		writeUnaryError(w, e)
		return
	}
	user, e := h.callUser(r)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	p, e := filePath(req.Path, user)
	if e != nil && req.Path != "/" {
		writeUnaryError(w, e)
		return
	}
	if req.Path == "/" {
		p = "/"
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
	defer cancel()
	a, _, _, e := h.agent(ctx)
	if e != nil {
		writeUnaryError(w, e)
		return
	}
	res, err := a.ListDirAs(ctx, p, 0, user)
	if err != nil {
		writeUnaryError(w, classify(err))
		return
	}
	writeUnary(w, map[string]any{"entry": entryOf(res.Entries[0])})
}
