package e2b

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// readyCommandLabel is imagebuild.ReadyCommandLabel (an adapter does not
// import the builder; a test checks they agree): the image LABEL whose
// shell command the builder runs until it exits 0 before the snapshot.
const readyCommandLabel = "dev.kiln.ready-command"

// Bounds of a template build request (TemplateBuildStartV2).
const (
	maxSteps      = 256
	maxStepArgs   = 512
	maxStepArg    = 64 << 10
	maxStartCmd   = 64 << 10
	maxCopySteps  = 64
	maxImageRef   = 256
	filesDirInZip = ".kiln-e2b-files"
)

// buildStart is E2B's TemplateBuildStartV2, the body of
// POST /v2/templates/{templateID}/builds/{buildID}.
type buildStart struct {
	FromImage         string          `json:"fromImage"`
	FromTemplate      string          `json:"fromTemplate"`
	FromImageRegistry json.RawMessage `json:"fromImageRegistry"`
	StartCmd          string          `json:"startCmd"`
	ReadyCmd          string          `json:"readyCmd"`
	Force             bool            `json:"force"`
	Steps             []templateStep  `json:"steps"`
}

// templateStep is E2B's TemplateStep.
type templateStep struct {
	Type      string   `json:"type"`
	Args      []string `json:"args"`
	FilesHash string   `json:"filesHash"`
	Force     bool     `json:"force"`
}

// templatePlan is a checked build request: the Dockerfile it maps onto
// and the uploads (by files hash) its COPY steps read.
type templatePlan struct {
	Dockerfile string
	Hashes     []string // distinct, in the order the steps name them
}

var (
	filesHashRE = regexp.MustCompile(`^[0-9a-f]{64}$`)
	userRE      = regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,63}(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,63})?$`)
	modeRE      = regexp.MustCompile(`^0?[0-7]{3,4}$`)
)

// debianTags are the debian image tags kiln's managed debian-12 base
// stands for: bookworm, and the moving names that meant it when kiln's
// base was made ("stable", E2B's fromDebianImage() default, and latest).
var debianTags = map[string]bool{"": true, "12": true, "bookworm": true, "12-slim": true, "bookworm-slim": true,
	"stable": true, "stable-slim": true, "latest": true}

// managedBase resolves a fromImage to kiln's managed base, reporting
// whether it names a debian image at all.
func managedBase(ref string) (base string, debian bool) {
	r := strings.TrimPrefix(strings.TrimPrefix(ref, "docker.io/"), "library/")
	name, tag, _ := strings.Cut(r, ":")
	if name != "debian" {
		return "", false
	}
	if debianTags[tag] {
		return "debian:12", true
	}
	return "", true
}

// badStep is a 400 about step i (1-based, as the SDK's stack traces count
// steps after the base).
func badStep(i int, format string, args ...any) error {
	return errorf(400, "template step %d: %s", i, fmt.Sprintf(format, args...))
}

// parseBuildStart decodes and checks a build request. The base is
// resolved by the caller (baseFrom), which may need the store.
func parseBuildStart(body []byte) (buildStart, error) {
	var in buildStart
	if len(body) == 0 {
		return in, errorf(400, "request body is empty: send the template (fromImage, steps, startCmd, readyCmd)")
	}
	if err := json.Unmarshal(body, &in); err != nil {
		return in, errorf(400, "request body is not a valid TemplateBuildStartV2: %v", err)
	}
	switch {
	case set(in.FromImageRegistry):
		return in, errorf(400, "fromImageRegistry: kiln has no access to container registries; build from fromDebianImage('bookworm') (kiln's managed debian-12) or from one of your kiln images by name")
	case (in.FromImage == "") == (in.FromTemplate == ""):
		return in, errorf(400, "exactly one of fromImage and fromTemplate must be given")
	case len(in.FromImage) > maxImageRef || len(in.FromTemplate) > maxImageRef:
		return in, errorf(400, "fromImage and fromTemplate are at most %d characters", maxImageRef)
	case len(in.StartCmd) > maxStartCmd || len(in.ReadyCmd) > maxStartCmd:
		return in, errorf(400, "startCmd and readyCmd are at most %d bytes", maxStartCmd)
	case strings.ContainsRune(in.StartCmd, 0) || strings.ContainsRune(in.ReadyCmd, 0):
		return in, errorf(400, "startCmd and readyCmd must not hold NUL bytes")
	case strings.ContainsAny(in.ReadyCmd, "\n\r"):
		// It travels as an image LABEL, which holds one line.
		return in, errorf(400, "readyCmd must be one line: join its commands with ; or &&")
	case len(in.Steps) > maxSteps:
		return in, errorf(400, "a template has at most %d steps, not %d", maxSteps, len(in.Steps))
	}
	copies := 0
	for i, st := range in.Steps {
		n := i + 1
		if len(st.Args) > maxStepArgs {
			return in, badStep(n, "at most %d arguments", maxStepArgs)
		}
		for _, a := range st.Args {
			if len(a) > maxStepArg || strings.ContainsRune(a, 0) {
				return in, badStep(n, "an argument is longer than %d bytes or holds a NUL byte", maxStepArg)
			}
		}
		switch st.Type {
		case "RUN":
			if len(st.Args) < 1 || len(st.Args) > 2 || strings.TrimSpace(st.Args[0]) == "" {
				return in, badStep(n, "RUN takes a command and optionally a user")
			}
			if len(st.Args) == 2 && st.Args[1] != "" && !userRE.MatchString(st.Args[1]) {
				return in, badStep(n, "RUN user %q is not a user name (letters, digits, _ . -; optionally :group)", st.Args[1])
			}
		case "COPY":
			copies++
			if copies > maxCopySteps {
				return in, badStep(n, "a template has at most %d COPY steps", maxCopySteps)
			}
			if len(st.Args) < 2 || len(st.Args) > 4 {
				return in, badStep(n, "COPY takes a source, a destination, and optionally a user and a mode")
			}
			if err := checkCopySource(st.Args[0]); err != nil {
				return in, badStep(n, "%v", err)
			}
			if st.Args[1] == "" || strings.ContainsAny(st.Args[1], "\n\r") {
				return in, badStep(n, "COPY destination must be a path on one line")
			}
			if len(st.Args) > 2 && st.Args[2] != "" && !userRE.MatchString(st.Args[2]) {
				return in, badStep(n, "COPY user %q is not a user name", st.Args[2])
			}
			if len(st.Args) > 3 && st.Args[3] != "" && !modeRE.MatchString(st.Args[3]) {
				return in, badStep(n, "COPY mode %q is not an octal mode such as 0644", st.Args[3])
			}
			if !filesHashRE.MatchString(st.FilesHash) {
				return in, badStep(n, "COPY needs filesHash, the lower-case hex SHA-256 the SDK computes for its files")
			}
		case "ENV":
			if len(st.Args) == 0 || len(st.Args)%2 != 0 {
				return in, badStep(n, "ENV takes name and value pairs")
			}
			for j := 0; j < len(st.Args); j += 2 {
				if !validEnvName(st.Args[j]) || strings.ContainsAny(st.Args[j+1], "\n\r") {
					return in, badStep(n, "ENV %q: names are letters, digits and _ (not starting with a digit), values one line", st.Args[j])
				}
			}
		case "WORKDIR":
			// A trailing backslash would continue the Dockerfile line.
			if len(st.Args) != 1 || st.Args[0] == "" || strings.ContainsAny(st.Args[0], "\n\r") || strings.HasSuffix(st.Args[0], "\\") {
				return in, badStep(n, "WORKDIR takes one path on one line, not ending in a backslash")
			}
		case "USER":
			if len(st.Args) != 1 || !userRE.MatchString(st.Args[0]) {
				return in, badStep(n, "USER takes one user name (letters, digits, _ . -; optionally :group)")
			}
		default:
			return in, badStep(n, "step type %q is not supported by kiln (RUN, COPY, ENV, WORKDIR and USER are; the SDK's aptInstall, pipInstall, makeDir and the like are RUN steps)", st.Type)
		}
	}
	return in, nil
}

// checkCopySource refuses a COPY source that could leave the uploaded
// files: absolute, or with a ".." element (the SDK refuses both too).
func checkCopySource(src string) error {
	if src == "" || strings.ContainsAny(src, "\n\r\\") {
		return fmt.Errorf("COPY source must be a relative path on one line")
	}
	if strings.HasPrefix(src, "/") {
		return fmt.Errorf("COPY source %q must be relative to the template's file context", src)
	}
	for _, el := range strings.Split(src, "/") {
		if el == ".." {
			return fmt.Errorf("COPY source %q must not leave the file context (..)", src)
		}
	}
	return nil
}

// jsonArgs is a Dockerfile exec-form array: a JSON array of strings,
// which keeps every byte of a command (quotes, newlines, $) as written.
func jsonArgs(args ...string) string {
	b, _ := json.Marshal(args)
	return string(b)
}

// dqWord quotes a value for ENV or LABEL. literal also escapes $, so the
// value is not expanded (a ready command is for the shell, later).
func dqWord(v string, literal bool) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range v {
		if c == '"' || c == '\\' || (literal && c == '$') {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	b.WriteByte('"')
	return b.String()
}

// forceArg writes an ARG with this build's id. An ARG's value is part of
// the cache key of every step after it (as in BuildKit, where it is in
// the steps' environment), so they run again instead of coming from the
// cache. A LABEL would not do: labels are image metadata and key nothing.
func forceArg(b *strings.Builder, buildID string) {
	fmt.Fprintf(b, "ARG %s=%s\n", forceArgName, dqWord(buildID, true))
}

// forceArgName is the ARG of a forced build; RUN steps after it see it in
// their environment.
const forceArgName = "KILN_E2B_BUILD"

// dockerfile maps a checked build request onto a Dockerfile for kiln's
// image builder. from is the FROM line's image; buildID busts the step
// cache at forced steps (E2B's force and skipCache); head, if not empty,
// is a kiln image's own Dockerfile the template builds on (fromImage of a
// kiln image), whose last stage the steps continue.
func (in buildStart) dockerfile(from, buildID, head string) templatePlan {
	var b strings.Builder
	if head != "" {
		b.WriteString(strings.TrimRight(head, "\n"))
		b.WriteString("\n")
	} else {
		fmt.Fprintf(&b, "FROM %s\n", from)
	}
	if in.Force {
		forceArg(&b, buildID)
	}
	var plan templatePlan
	seen := map[string]bool{}
	user := ""
	for _, st := range in.Steps {
		if st.Force && !in.Force {
			forceArg(&b, buildID)
		}
		switch st.Type {
		case "RUN":
			as := ""
			if len(st.Args) == 2 {
				as = st.Args[1]
			}
			if as != "" {
				fmt.Fprintf(&b, "USER %s\n", as)
			}
			fmt.Fprintf(&b, "RUN %s\n", jsonArgs("/bin/bash", "-c", st.Args[0]))
			if as != "" {
				fmt.Fprintf(&b, "USER %s\n", orDefault(user, "root"))
			}
		case "COPY":
			if !seen[st.FilesHash] {
				seen[st.FilesHash] = true
				plan.Hashes = append(plan.Hashes, st.FilesHash)
			}
			b.WriteString("COPY ")
			if len(st.Args) > 2 && st.Args[2] != "" {
				fmt.Fprintf(&b, "--chown=%s ", st.Args[2])
			}
			if len(st.Args) > 3 && st.Args[3] != "" {
				fmt.Fprintf(&b, "--chmod=%s ", st.Args[3])
			}
			src := filesDirInZip + "/" + st.FilesHash + "/" + strings.TrimPrefix(st.Args[0], "./")
			b.WriteString(jsonArgs(src, st.Args[1]))
			b.WriteString("\n")
		case "ENV":
			b.WriteString("ENV")
			for j := 0; j < len(st.Args); j += 2 {
				fmt.Fprintf(&b, " %s=%s", st.Args[j], dqWord(st.Args[j+1], false))
			}
			b.WriteString("\n")
		case "WORKDIR":
			fmt.Fprintf(&b, "WORKDIR %s\n", st.Args[0])
		case "USER":
			user = st.Args[0]
			fmt.Fprintf(&b, "USER %s\n", user)
		}
	}
	// E2B runs the start command with bash as the template's user in its
	// workdir; kiln starts CMD so, and snapshots once the ready command
	// exits 0. Without a start command the sandbox has nothing to run:
	// a sleeping shell keeps the image's app alive.
	if in.StartCmd != "" {
		fmt.Fprintf(&b, "CMD %s\n", jsonArgs("/bin/bash", "-l", "-c", in.StartCmd))
	} else {
		fmt.Fprintf(&b, "CMD %s\n", jsonArgs("/bin/sh", "-c", "while :; do sleep 3600; done"))
	}
	ready := in.ReadyCmd
	if strings.TrimSpace(ready) == "" {
		ready = "true"
	}
	fmt.Fprintf(&b, "LABEL %s=%s\n", readyCommandLabel, dqWord(ready, true))
	plan.Dockerfile = b.String()
	return plan
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}
