package api

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"
)

// The validation layer: every operation's input is checked against the
// constraints of AWS's model (required members, lengths, patterns, ranges,
// enums) before its handler runs, so before any resource is looked up, as
// AWS does. A bad request for a resource that does not exist is therefore
// a ValidationException, never a 404.
//
// Member names, locations and required flags are those of the official
// SDK's schema (@aws-sdk/client-lambda-microvms; extract in
// testdata/aws-model.json, made by test/sdk/model.mjs, and
// TestRulesMatchModel keeps this table in step with it). The SDK's schema
// carries no @length/@pattern/@range traits; the values below are AWS's API
// reference's ("Length Constraints", "Pattern", "Valid Range", "Array
// Members" of each request member, docs.aws.amazon.com/lambda/latest/
// microvm-api/API_<Operation>.html). Where kiln accepts less than AWS the
// rule says why (see docs/COMPATIBILITY.md).

// rule constrains the member at path: dotted member names, [] for every
// element of a list, {} for every value of a map.
type rule struct {
	path      string
	required  bool
	minLen    int // strings: characters; lists: items; maps: entries (0: none)
	maxLen    int // 0: none
	pattern   string
	min, max  *int64 // numbers
	enum      []string
	sensitive bool // the value is not echoed in the message
}

func i64(v int64) *int64 { return &v }

// Shared shapes of the model, with AWS's constraints.
var (
	// ARNs and identifiers: "Length Constraints: Minimum length of 1.
	// Maximum length of 2048. Pattern: [^\s]+".
	arnRule = func(path string, required bool) rule {
		return rule{path: path, required: required, minLen: 1, maxLen: 2048, pattern: `[^\s]+`}
	}
	maxResultsRule = rule{path: "maxResults", min: i64(1), max: i64(50)}
	nextTokenRule  = rule{path: "nextToken", minLen: 1, maxLen: 1024}
	hookStateEnum  = []string{"ENABLED", "DISABLED"}
	// MemorySizesMiB are the baselines AWS offers for
	// resources.minimumMemoryInMiB, each with a quarter vCPU per 512 MiB
	// (0.5 GB / 0.25 vCPU up to 8 GB / 4 vCPU; a running MicroVM may burst to
	// four times its baseline). See VCPUsFor.
	MemorySizesMiB = []int64{512, 1024, 2048, 4096, 8192}
)

func memoryEnum() []string {
	out := make([]string, len(MemorySizesMiB))
	for i, m := range MemorySizesMiB {
		out[i] = strconv.FormatInt(m, 10)
	}
	return out
}

// VCPUsFor is the vCPU count kiln gives a microVM of memMiB: AWS's baseline
// (memMiB/2048, so 0.25 for 512 MiB) rounded up to a whole vCPU, since a
// QEMU guest has whole vCPUs.
func VCPUsFor(memMiB int64) int {
	v := int((memMiB + 2047) / 2048)
	return max(v, 1)
}

func imageConfigRules(nameRequired bool) []rule {
	rs := []rule{
		arnRule("baseImageArn", true),
		arnRule("buildRoleArn", true),
		{path: "codeArtifact", required: true},
		arnRule("codeArtifact.uri", false),
		arnRule("baseImageVersion", false),
		{path: "description", maxLen: 256},
		{path: "logging.cloudWatch.logGroup", minLen: 1, maxLen: 512, pattern: `[a-zA-Z0-9_\-/.#]+`},
		{path: "logging.cloudWatch.logStream", minLen: 1, maxLen: 512, pattern: `[^:*]*`},
		{path: "egressNetworkConnectors", maxLen: 10},
		arnRule("egressNetworkConnectors[]", false),
		{path: "cpuConfigurations"},
		{path: "cpuConfigurations[].architecture", required: true, enum: []string{"ARM_64", "X86_64"}},
		{path: "resources"},
		{path: "resources[].minimumMemoryInMiB", required: true, enum: memoryEnum()},
		{path: "additionalOsCapabilities"},
		{path: "additionalOsCapabilities[]", enum: []string{"ALL"}},
		{path: "hooks.port", min: i64(1), max: i64(65535)},
		{path: "hooks.microvmHooks.run", enum: hookStateEnum},
		{path: "hooks.microvmHooks.runTimeoutInSeconds", min: i64(1), max: i64(60)},
		{path: "hooks.microvmHooks.resume", enum: hookStateEnum},
		{path: "hooks.microvmHooks.resumeTimeoutInSeconds", min: i64(1), max: i64(60)},
		{path: "hooks.microvmHooks.suspend", enum: hookStateEnum},
		{path: "hooks.microvmHooks.suspendTimeoutInSeconds", min: i64(1), max: i64(60)},
		{path: "hooks.microvmHooks.terminate", enum: hookStateEnum},
		{path: "hooks.microvmHooks.terminateTimeoutInSeconds", min: i64(1), max: i64(60)},
		{path: "hooks.microvmImageHooks.ready", enum: hookStateEnum},
		{path: "hooks.microvmImageHooks.readyTimeoutInSeconds", min: i64(1), max: i64(3600)},
		{path: "hooks.microvmImageHooks.validate", enum: hookStateEnum},
		{path: "hooks.microvmImageHooks.validateTimeoutInSeconds", min: i64(1), max: i64(3600)},
		{path: "environmentVariables", maxLen: 50},
		{path: "environmentVariables{}", maxLen: 4096, sensitive: true},
		{path: "clientToken", minLen: 1, maxLen: 128},
	}
	if nameRequired {
		rs = append(rs,
			rule{path: "name", required: true, minLen: 1, maxLen: 64, pattern: `[a-zA-Z0-9-_]+`},
			rule{path: "tags", maxLen: 50},
			rule{path: "tags{}", maxLen: 256})
	} else {
		rs = append(rs, arnRule("imageIdentifier", true))
	}
	return rs
}

var portRules = []rule{
	{path: "allowedPorts", required: true, minLen: 1, maxLen: 20},
	{path: "allowedPorts[].port", min: i64(1), max: i64(65535)},
	{path: "allowedPorts[].range.startPort", required: true, min: i64(1), max: i64(65535)},
	{path: "allowedPorts[].range.endPort", required: true, min: i64(1), max: i64(65535)},
}

// rules is the table: every operation of the model, every constrained
// member. Members the model lists and that carry no constraint are listed
// too (TestRulesMatchModel requires each of the model's members here).
var rules = map[string][]rule{
	"CreateMicrovmAuthToken": append([]rule{arnRule("microvmIdentifier", true),
		{path: "expirationInMinutes", required: true, min: i64(1), max: i64(60)}}, portRules...),
	"CreateMicrovmImage": imageConfigRules(true),
	"CreateMicrovmShellAuthToken": {arnRule("microvmIdentifier", true),
		{path: "expirationInMinutes", required: true, min: i64(1), max: i64(60)}},
	"DeleteMicrovmImage":              {arnRule("imageIdentifier", true)},
	"DeleteMicrovmImageVersion":       {arnRule("imageIdentifier", true), arnRule("imageVersion", true)},
	"GetMicrovm":                      {arnRule("microvmIdentifier", true)},
	"GetMicrovmImage":                 {arnRule("imageIdentifier", true)},
	"GetMicrovmImageBuild":            {arnRule("imageIdentifier", true), arnRule("imageVersion", true), arnRule("buildId", true)},
	"GetMicrovmImageVersion":          {arnRule("imageIdentifier", true), arnRule("imageVersion", true)},
	"ListManagedMicrovmImageVersions": {arnRule("imageIdentifier", true), maxResultsRule, nextTokenRule},
	"ListManagedMicrovmImages":        {maxResultsRule, nextTokenRule},
	"ListMicrovmImageBuilds": {arnRule("imageIdentifier", true), arnRule("imageVersion", true), maxResultsRule, nextTokenRule,
		{path: "architecture", enum: []string{"ARM_64", "X86_64"}},
		// Bounds kiln sets where we found none in AWS's reference (also
		// nameFilter, tag keys and values): generous, so that they refuse
		// only abuse.
		{path: "chipset", minLen: 1, maxLen: 64},
		{path: "chipsetGeneration", minLen: 1, maxLen: 64}},
	"ListMicrovmImageVersions": {arnRule("imageIdentifier", true), maxResultsRule, nextTokenRule},
	"ListMicrovmImages":        {maxResultsRule, nextTokenRule, {path: "nameFilter", minLen: 1, maxLen: 64}},
	"ListMicrovms":             {maxResultsRule, nextTokenRule, arnRule("imageIdentifier", false), arnRule("imageVersion", false)},
	"ListTags":                 {arnRule("Resource", true)},
	"ResumeMicrovm":            {arnRule("microvmIdentifier", true)},
	"RunMicrovm": {
		arnRule("imageIdentifier", true),
		{path: "ingressNetworkConnectors", maxLen: 10},
		arnRule("ingressNetworkConnectors[]", false),
		{path: "egressNetworkConnectors", maxLen: 10},
		arnRule("egressNetworkConnectors[]", false),
		arnRule("imageVersion", false),
		arnRule("executionRoleArn", false),
		{path: "idlePolicy.maxIdleDurationSeconds", required: true, min: i64(60)},
		{path: "idlePolicy.suspendedDurationSeconds", required: true, min: i64(0)},
		{path: "idlePolicy.autoResumeEnabled", required: true},
		{path: "logging.cloudWatch.logGroup", minLen: 1, maxLen: 512, pattern: `[a-zA-Z0-9_\-/.#]+`},
		{path: "logging.cloudWatch.logStream", minLen: 1, maxLen: 512, pattern: `[^:*]*`},
		{path: "runHookPayload", maxLen: MaxRunHookPayload, sensitive: true},
		{path: "maximumDurationInSeconds", min: i64(1), max: i64(MaxDurationSeconds)},
		{path: "clientToken", minLen: 1, maxLen: 128},
	},
	"SuspendMicrovm": {arnRule("microvmIdentifier", true)},
	"TagResource": {arnRule("Resource", true), {path: "Tags", required: true, maxLen: 50},
		{path: "Tags{}", maxLen: 256}},
	"TerminateMicrovm": {arnRule("microvmIdentifier", true)},
	"UntagResource": {arnRule("Resource", true), {path: "TagKeys", required: true, minLen: 1, maxLen: 50},
		{path: "TagKeys[]", minLen: 1, maxLen: 128}},
	"UpdateMicrovmImage": imageConfigRules(false),
	"UpdateMicrovmImageVersion": {arnRule("imageIdentifier", true), arnRule("imageVersion", true),
		{path: "status", required: true, enum: []string{"ACTIVE", "INACTIVE"}}},
}

// wire says where an operation's members travel other than the JSON body:
// the path labels of its route and, for operations without a body, query
// parameters (the model's httpLabel and httpQuery traits; the query
// parameter has the member's name except UntagResource's tagKeys).
type wire struct {
	labels []string
	query  map[string]string // member -> query parameter
	lists  map[string]bool   // query members that are lists
}

var labelRE = regexp.MustCompile(`\{([A-Za-z]+)\}`)

func wireOf(op, pattern string) wire {
	w := wire{query: map[string]string{}, lists: map[string]bool{}}
	isLabel := map[string]bool{}
	for _, m := range labelRE.FindAllStringSubmatch(pattern, -1) {
		w.labels = append(w.labels, m[1])
		isLabel[m[1]] = true
	}
	if strings.HasPrefix(pattern, "GET ") || strings.HasPrefix(pattern, "DELETE ") {
		for _, r := range rules[op] {
			if strings.ContainsAny(r.path, ".[{") || isLabel[r.path] {
				continue
			}
			if r.path == "TagKeys" {
				w.query[r.path], w.lists[r.path] = "tagKeys", true
				continue
			}
			w.query[r.path] = r.path
		}
	}
	return w
}

// input assembles an operation's input as one JSON-like tree: path labels
// and query parameters as members, and the body's members.
func input(w wire, pathValue func(string) string, q url.Values, body []byte) (map[string]any, error) {
	in := map[string]any{}
	if len(bytes.TrimSpace(body)) > 0 {
		d := json.NewDecoder(bytes.NewReader(body))
		d.UseNumber()
		var v any
		if err := d.Decode(&v); err != nil {
			return nil, validation("request body is not valid JSON: %v", err)
		}
		m, ok := v.(map[string]any)
		if !ok {
			return nil, validation("request body must be a JSON object")
		}
		in = m
	}
	for _, l := range w.labels {
		in[l] = pathValue(l)
	}
	for member, param := range w.query {
		vs, ok := q[param]
		if !ok {
			continue
		}
		if w.lists[member] {
			l := make([]any, len(vs))
			for i, v := range vs {
				l[i] = v
			}
			in[member] = l
			continue
		}
		if member == "maxResults" {
			in[member] = json.Number(vs[0])
			continue
		}
		in[member] = vs[0]
	}
	return in, nil
}

// violation is one broken constraint, in AWS's words.
type violation struct {
	field      string
	value      any
	hasValue   bool
	constraint string
}

func (v violation) String() string {
	if !v.hasValue {
		return fmt.Sprintf("Value null at '%s' failed to satisfy constraint: %s", v.field, v.constraint)
	}
	if v.value == nil {
		return fmt.Sprintf("Value at '%s' failed to satisfy constraint: %s", v.field, v.constraint)
	}
	return fmt.Sprintf("Value '%v' at '%s' failed to satisfy constraint: %s", render(v.value), v.field, v.constraint)
}

func render(v any) string {
	switch x := v.(type) {
	case []any:
		parts := make([]string, len(x))
		for i, e := range x {
			parts[i] = render(e)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case map[string]any:
		return "{...}"
	}
	return fmt.Sprint(v)
}

// validateOp checks in against op's rules and answers every violation at
// once, as AWS does: "N validation errors detected: ...; ...".
func validateOp(op string, in map[string]any) *Error {
	var vs []violation
	for _, r := range rules[op] {
		vs = append(vs, check(r, in)...)
	}
	if len(vs) == 0 {
		return nil
	}
	msgs := make([]string, len(vs))
	for i, v := range vs {
		msgs[i] = v.String()
	}
	noun := "error"
	if len(vs) > 1 {
		noun = "errors"
	}
	return validation("%d validation %s detected: %s", len(vs), noun, strings.Join(msgs, "; "))
}

// located is a value at a concrete field path (AWS's: 1-based list
// indexes, map keys).
type located struct {
	field string
	value any
}

// check applies r to every value its path reaches in in.
func check(r rule, in map[string]any) []violation {
	segs := strings.Split(r.path, ".")
	last := segs[len(segs)-1]
	parents := []located{{"", in}}
	for _, s := range segs[:len(segs)-1] {
		parents = step(parents, s)
	}
	var out []violation
	for _, p := range parents {
		obj, ok := p.value.(map[string]any)
		if !ok {
			continue
		}
		name, each := strings.CutSuffix(last, "[]")
		mapEach := false
		if !each {
			name, mapEach = strings.CutSuffix(last, "{}")
		}
		field := join(p.field, name)
		v, present := obj[name]
		if !present || v == nil {
			if r.required {
				out = append(out, violation{field: field, constraint: "Member must not be null"})
			}
			continue
		}
		switch {
		case each:
			l, _ := v.([]any)
			for i, e := range l {
				out = append(out, checkValue(r, join(field, strconv.Itoa(i+1)), e)...)
			}
		case mapEach:
			m, _ := v.(map[string]any)
			for k, e := range m {
				out = append(out, checkValue(r, join(field, k), e)...)
			}
		default:
			out = append(out, checkValue(r, field, v)...)
		}
	}
	return out
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

func step(ls []located, seg string) []located {
	var out []located
	name, each := strings.CutSuffix(seg, "[]")
	mapEach := false
	if !each {
		name, mapEach = strings.CutSuffix(seg, "{}")
	}
	for _, l := range ls {
		obj, ok := l.value.(map[string]any)
		if !ok {
			continue
		}
		v, ok := obj[name]
		if !ok || v == nil {
			continue
		}
		f := join(l.field, name)
		switch {
		case each:
			if list, ok := v.([]any); ok {
				for i, e := range list {
					out = append(out, located{join(f, strconv.Itoa(i+1)), e})
				}
			}
		case mapEach:
			if m, ok := v.(map[string]any); ok {
				for k, e := range m {
					out = append(out, located{join(f, k), e})
				}
			}
		default:
			out = append(out, located{f, v})
		}
	}
	return out
}

var patterns = map[string]*regexp.Regexp{}

func compiled(p string) *regexp.Regexp {
	if re, ok := patterns[p]; ok {
		return re
	}
	re := regexp.MustCompile("^(?:" + p + ")$")
	patterns[p] = re
	return re
}

func init() {
	for _, rs := range rules {
		for _, r := range rs {
			if r.pattern != "" {
				compiled(r.pattern)
			}
		}
	}
}

func checkValue(r rule, field string, v any) []violation {
	shown := v
	if r.sensitive {
		shown = nil
	}
	bad := func(c string) []violation {
		return []violation{{field: field, value: shown, hasValue: true, constraint: c}}
	}
	var n int
	sized := false
	switch x := v.(type) {
	case string:
		n, sized = len([]rune(x)), true
	case []any:
		n, sized = len(x), true
	case map[string]any:
		n, sized = len(x), true
	}
	if sized {
		if r.minLen > 0 && n < r.minLen {
			return bad(fmt.Sprintf("Member must have length greater than or equal to %d", r.minLen))
		}
		if r.maxLen > 0 && n > r.maxLen {
			return bad(fmt.Sprintf("Member must have length less than or equal to %d", r.maxLen))
		}
	}
	if s, ok := v.(string); ok && r.pattern != "" && !compiled(r.pattern).MatchString(s) {
		return bad("Member must satisfy regular expression pattern: " + r.pattern)
	}
	if r.min != nil || r.max != nil {
		num, ok := v.(json.Number)
		if !ok {
			if s, isStr := v.(string); isStr {
				num, ok = json.Number(s), true
			}
		}
		i, err := num.Int64()
		if !ok || err != nil {
			return bad("Member must be a number")
		}
		if r.min != nil && i < *r.min {
			return bad(fmt.Sprintf("Member must have value greater than or equal to %d", *r.min))
		}
		if r.max != nil && i > *r.max {
			return bad(fmt.Sprintf("Member must have value less than or equal to %d", *r.max))
		}
	}
	if len(r.enum) > 0 {
		s := fmt.Sprint(v)
		ok := false
		for _, e := range r.enum {
			ok = ok || e == s
		}
		if !ok {
			return bad("Member must satisfy enum value set: [" + strings.Join(r.enum, ", ") + "]")
		}
	}
	return nil
}
