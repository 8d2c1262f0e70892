package api_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/kiln-sandbox/kiln/internal/api"
	"github.com/kiln-sandbox/kiln/internal/awscli"
)

// modelOp is one operation of testdata/aws-model.json, the SDK's schema
// as test/sdk/model.mjs extracts it.
type modelOp struct {
	Method  string `json:"method"`
	URI     string `json:"uri"`
	Members []struct {
		Path     string `json:"path"`
		Location string `json:"location"`
		Required bool   `json:"required"`
		Type     string `json:"type"`
	} `json:"members"`
}

func loadModel(t *testing.T) map[string]modelOp {
	t.Helper()
	b, err := os.ReadFile("testdata/aws-model.json")
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]modelOp
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestRulesMatchModel keeps the validation table in step with AWS's model:
// the same operations, no rule for a member the model lacks, the same
// required members, and a rule for every scalar or collection member of
// the request (so a member the model adds shows up here).
func TestRulesMatchModel(t *testing.T) {
	model, rules := loadModel(t), api.Rules()
	if len(model) != 24 {
		t.Fatalf("model has %d operations, want 24", len(model))
	}
	for op := range rules {
		if _, ok := model[op]; !ok {
			t.Errorf("rules for %s, which the model does not have", op)
		}
	}
	for op, m := range model {
		rs, ok := rules[op]
		if !ok {
			t.Errorf("%s: no rules", op)
			continue
		}
		byPath := map[string]api.RuleView{}
		for _, r := range rs {
			byPath[r.Path] = r
		}
		types := map[string]string{}
		for _, mem := range m.Members {
			types[mem.Path] = mem.Type
			r, has := byPath[mem.Path]
			if mem.Required && !r.Required {
				t.Errorf("%s.%s: required in the model, not in the rules", op, mem.Path)
			}
			if !has && !strings.Contains(mem.Path, ".") && mem.Type != "structure" && mem.Type != "union" && mem.Type != "boolean" {
				t.Errorf("%s.%s (%s): no rule", op, mem.Path, mem.Type)
			}
		}
		for _, r := range rs {
			if _, ok := types[r.Path]; !ok {
				t.Errorf("%s: rule for %s, which the model does not have", op, r.Path)
			}
			if r.Required && !slices.ContainsFunc(m.Members, func(mem struct {
				Path     string `json:"path"`
				Location string `json:"location"`
				Required bool   `json:"required"`
				Type     string `json:"type"`
			}) bool {
				return mem.Path == r.Path && mem.Required
			}) {
				t.Errorf("%s.%s: required in the rules, not in the model", op, r.Path)
			}
		}
	}
}

// invalidCase is one request breaking one constraint.
type invalidCase struct {
	name  string
	field string // as AWS names it in the message
	set   func(path map[string]string, q url.Values, body map[string]any)
}

// validBodies are minimal valid bodies for the operations that have one.
func validBody(op string) map[string]any {
	switch op {
	case "CreateMicrovmImage":
		return imageBody("valid-name")
	case "UpdateMicrovmImage":
		b := imageBody("x")
		delete(b, "name")
		delete(b, "tags")
		return b
	case "RunMicrovm":
		return map[string]any{"imageIdentifier": "no-such-image"}
	case "CreateMicrovmAuthToken":
		return map[string]any{"expirationInMinutes": 5, "allowedPorts": []any{map[string]any{"port": 8080}}}
	case "CreateMicrovmShellAuthToken":
		return map[string]any{"expirationInMinutes": 5}
	case "UpdateMicrovmImageVersion":
		return map[string]any{"status": "INACTIVE"}
	case "TagResource":
		return map[string]any{"Tags": map[string]any{"k": "v"}}
	}
	return nil
}

// setAt puts v at a rule path in body, creating parents (a one-element
// list for [], a map with key "k" for {}); v == nil removes the member.
func setAt(body map[string]any, path string, v any) {
	segs := strings.Split(path, ".")
	cur := body
	for i, s := range segs {
		last := i == len(segs)-1
		name, list := strings.CutSuffix(s, "[]")
		name, dict := strings.CutSuffix(name, "{}")
		if last && !list && !dict {
			if v == nil {
				delete(cur, name)
			} else {
				cur[name] = v
			}
			return
		}
		switch {
		case list && last:
			cur[name] = []any{v}
			return
		case dict && last:
			cur[name] = map[string]any{"k": v}
			return
		case list:
			next := map[string]any{}
			cur[name] = []any{next}
			cur = next
		case dict:
			next := map[string]any{}
			cur[name] = map[string]any{"k": next}
			cur = next
		default:
			next, ok := cur[name].(map[string]any)
			if !ok {
				next = map[string]any{}
				cur[name] = next
			}
			cur = next
		}
	}
}

func awsField(path string) string {
	return strings.NewReplacer("[]", ".1", "{}", ".k").Replace(path)
}

// casesFor makes one invalid request per constraint of r.
func casesFor(r api.RuleView, loc, typ string) []invalidCase {
	var out []invalidCase
	field := awsField(r.Path)
	put := func(v any) func(map[string]string, url.Values, map[string]any) {
		return func(path map[string]string, q url.Values, body map[string]any) {
			switch {
			case loc == "path":
				path[r.Path] = fmt.Sprint(v)
			case strings.HasPrefix(loc, "query:"):
				p := strings.TrimPrefix(loc, "query:")
				if v == nil {
					q.Del(p)
				} else {
					q.Set(p, fmt.Sprint(v))
				}
			default:
				setAt(body, r.Path, v)
			}
		}
	}
	add := func(name string, v any) { out = append(out, invalidCase{name, field, put(v)}) }
	if r.Required && loc != "path" {
		add("missing", nil)
	}
	isList := typ == "list" || typ == "map"
	if r.MaxLen > 0 {
		switch {
		case typ == "list" && loc != "body":
			// a query list: too many values
		case typ == "list":
			l := make([]any, r.MaxLen+1)
			for i := range l {
				l[i] = "arn:aws:lambda:us-east-1:aws:network-connector:x"
			}
			add("too many", l)
		case typ == "map":
			m := map[string]any{}
			for i := range r.MaxLen + 1 {
				m[fmt.Sprintf("k%d", i)] = "v"
			}
			add("too many", m)
		default:
			add("too long", strings.Repeat("x", r.MaxLen+1))
		}
	}
	if r.MinLen > 0 && !isList && loc != "path" {
		add("too short", "")
	}
	if r.MinLen > 0 && typ == "list" && loc == "body" {
		add("too few", []any{})
	}
	if r.Pattern != "" {
		re := regexp.MustCompile("^(?:" + r.Pattern + ")$")
		for _, bad := range []string{"has space", "a:*b"} {
			if re.MatchString(bad) {
				continue
			}
			if loc == "path" {
				bad = url.PathEscape(bad)
			}
			add("pattern", bad)
			break
		}
	}
	if r.Min != nil {
		add("below", *r.Min-1)
	}
	if r.Max != nil {
		add("above", *r.Max+1)
	}
	if len(r.Enum) > 0 {
		if typ == "number" {
			add("enum", 1000)
		} else {
			add("enum", "NOT_IN_SET")
		}
	}
	return out
}

// TestValidationBeforeLookup walks every constraint of every operation with
// one invalid value each, against resources that do not exist: each must
// be a 400 ValidationException naming the field (AWS validates before it
// looks anything up), never a 404.
func TestValidationBeforeLookup(t *testing.T) {
	e := newEnv(t)
	model, rules := loadModel(t), api.Rules()
	labelRE := regexp.MustCompile(`\{([A-Za-z]+)\}`)
	n := 0
	for op, m := range model {
		locs, types := map[string]string{}, map[string]string{}
		for _, mem := range m.Members {
			locs[mem.Path], types[mem.Path] = mem.Location, mem.Type
			if parent, ok := strings.CutSuffix(mem.Path, "[]"); ok {
				locs[mem.Path] = locs[parent] // a query list's elements are query values
			}
		}
		for _, r := range rules[op] {
			for _, c := range casesFor(r, locs[r.Path], types[r.Path]) {
				t.Run(op+"/"+r.Path+"/"+c.name, func(t *testing.T) {
					path := map[string]string{}
					for _, l := range labelRE.FindAllStringSubmatch(m.URI, -1) {
						path[l[1]] = "no-such-" + strings.ToLower(l[1])
					}
					if op == "UntagResource" || op == "TagResource" || op == "ListTags" {
						path["Resource"] = "arn:aws:lambda:us-east-1:111111111111:microvm:no-such-vm"
					}
					q := url.Values{}
					if op == "UntagResource" {
						q.Set("tagKeys", "k")
					}
					body := validBody(op)
					c.set(path, q, body)
					p := labelRE.ReplaceAllStringFunc(m.URI, func(s string) string { return path[s[1:len(s)-1]] })
					var b any
					if body != nil {
						b = body
					}
					_, err := do(t, e.c, m.Method, p, q, b)
					var ae *awscli.APIError
					if !errors.As(err, &ae) || ae.Type != "ValidationException" || !strings.Contains(ae.Message, "'"+c.field+"'") {
						t.Fatalf("%s %s: want ValidationException at '%s', got %v", m.Method, p, c.field, err)
					}
				})
				n++
			}
		}
	}
	t.Logf("%d invalid requests", n)
	if n < 100 {
		t.Fatalf("only %d cases: the walk is not covering the table", n)
	}
}

// TestValidationMessages checks AWS's message format, one and several
// violations.
func TestValidationMessages(t *testing.T) {
	e := newEnv(t)
	_, err := do(t, e.c, "POST", base+"/microvms/no-such-vm/auth-token", nil, map[string]any{"expirationInMinutes": 61, "allowedPorts": []any{}})
	fails(t, err, "ValidationException", "2 validation errors detected: Value '61' at 'expirationInMinutes' failed to satisfy constraint: Member must have value less than or equal to 60; Value '[]' at 'allowedPorts' failed to satisfy constraint: Member must have length greater than or equal to 1")
	b := imageBody(strings.Repeat("n", 65))
	_, err = do(t, e.c, "POST", base+"/microvm-images", nil, b)
	fails(t, err, "ValidationException", "1 validation error detected: Value '"+strings.Repeat("n", 65)+"' at 'name' failed to satisfy constraint: Member must have length less than or equal to 64")
}
