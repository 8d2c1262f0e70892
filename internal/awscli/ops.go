package awscli

// Kind is how a parameter is given on the command line.
type Kind int

const (
	String     Kind = iota
	Int             // a JSON number
	JSON            // a structure, map or list: JSON text or shorthand k=v,k2=v2
	StringList      // repeated flag or comma-separated
)

// Loc is where a parameter travels in the HTTP request.
type Loc int

const (
	Body Loc = iota
	Path
	Query
)

// Param is one member of an operation's input.
type Param struct {
	Name     string // wire name, e.g. imageIdentifier
	Kind     Kind
	Loc      Loc
	Required bool
	Help     string
}

// Operation is one API operation as the CLI exposes it.
type Operation struct {
	Name    string // RunMicrovm
	Command string // run-microvm
	Method  string
	Path    string // with {label}s
	Help    string
	Params  []Param
	// Wait names the Get operation --wait polls, and the field it reads.
	Wait string
}

func p(name string, k Kind, l Loc, req bool, help string) Param {
	return Param{Name: name, Kind: k, Loc: l, Required: req, Help: help}
}

var (
	imageID   = p("imageIdentifier", String, Path, true, "name or ARN of the image")
	versionID = p("imageVersion", String, Path, true, "image version")
	microvmID = p("microvmIdentifier", String, Path, true, "id or ARN of the microVM")
	maxRes    = p("maxResults", Int, Query, false, "maximum number of items per page")
	nextTok   = p("nextToken", String, Query, false, "token of the next page")
	resARN    = p("Resource", String, Path, true, "ARN of the microVM or image")
)

func imageConfigParams(nameOrID Param) []Param {
	return []Param{
		nameOrID,
		p("baseImageArn", String, Body, true, "ARN of the managed base image (list-managed-microvm-images)"),
		p("baseImageVersion", String, Body, false, "version of the base image"),
		p("buildRoleArn", String, Body, true, "IAM role ARN used by the build"),
		p("codeArtifact", JSON, Body, true, `code package, e.g. {"uri":"file:///path/app.zip"}`),
		p("description", String, Body, false, "description"),
		p("logging", JSON, Body, false, `{"disabled":{}} or {"cloudWatch":{"logGroup":"..."}}`),
		p("egressNetworkConnectors", StringList, Body, false, "egress network connector ARNs"),
		p("cpuConfigurations", JSON, Body, false, `e.g. [{"architecture":"X86_64"}]`),
		p("resources", JSON, Body, false, `e.g. [{"minimumMemoryInMiB":512}]`),
		p("additionalOsCapabilities", StringList, Body, false, "e.g. ALL"),
		p("hooks", JSON, Body, false, `e.g. {"port":9000,"microvmHooks":{"run":"ENABLED"}}`),
		p("environmentVariables", JSON, Body, false, `e.g. {"KEY":"value"}`),
	}
}

// Operations lists the 24 operations of the API (version 2025-09-09).
var Operations = []Operation{
	{Name: "CreateMicrovmImage", Command: "create-microvm-image", Method: "POST", Path: "/2025-09-09/microvm-images", Wait: "image",
		Help: "Create an image from a code package; it is built asynchronously (CREATING → CREATED)",
		Params: append(imageConfigParams(p("name", String, Body, true, "image name, unique in the account")),
			p("tags", JSON, Body, false, `e.g. {"team":"a"}`), p("clientToken", String, Body, false, "idempotency token"))},
	{Name: "GetMicrovmImage", Command: "get-microvm-image", Method: "GET", Path: "/2025-09-09/microvm-images/{imageIdentifier}",
		Help: "Describe an image", Params: []Param{imageID}},
	{Name: "UpdateMicrovmImage", Command: "update-microvm-image", Method: "PUT", Path: "/2025-09-09/microvm-images/{imageIdentifier}", Wait: "image",
		Help:   "Build a new version of an image",
		Params: append(imageConfigParams(imageID), p("clientToken", String, Body, false, "idempotency token"))},
	{Name: "DeleteMicrovmImage", Command: "delete-microvm-image", Method: "DELETE", Path: "/2025-09-09/microvm-images/{imageIdentifier}",
		Help: "Delete an image and all its versions", Params: []Param{imageID}},
	{Name: "GetMicrovmImageVersion", Command: "get-microvm-image-version", Method: "GET", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
		Help: "Describe an image version", Params: []Param{imageID, versionID}},
	{Name: "UpdateMicrovmImageVersion", Command: "update-microvm-image-version", Method: "PATCH", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
		Help: "Set a version ACTIVE or INACTIVE", Params: []Param{imageID, versionID, p("status", String, Body, true, "ACTIVE or INACTIVE")}},
	{Name: "DeleteMicrovmImageVersion", Command: "delete-microvm-image-version", Method: "DELETE", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}",
		Help: "Delete an image version", Params: []Param{imageID, versionID}},
	{Name: "ListMicrovmImages", Command: "list-microvm-images", Method: "GET", Path: "/2025-09-09/microvm-images",
		Help: "List images", Params: []Param{maxRes, nextTok, p("nameFilter", String, Query, false, "only names containing this")}},
	{Name: "ListMicrovmImageVersions", Command: "list-microvm-image-versions", Method: "GET", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions",
		Help: "List an image's versions", Params: []Param{imageID, maxRes, nextTok}},
	{Name: "ListMicrovmImageBuilds", Command: "list-microvm-image-builds", Method: "GET", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds",
		Help: "List a version's builds", Params: []Param{imageID, versionID, maxRes, nextTok,
			p("architecture", String, Query, false, "filter"), p("chipset", String, Query, false, "filter"), p("chipsetGeneration", String, Query, false, "filter")}},
	{Name: "GetMicrovmImageBuild", Command: "get-microvm-image-build", Method: "GET", Path: "/2025-09-09/microvm-images/{imageIdentifier}/versions/{imageVersion}/builds/{buildId}",
		Help: "Describe a build", Params: []Param{imageID, versionID, p("buildId", String, Path, true, "build id")}},
	{Name: "ListManagedMicrovmImages", Command: "list-managed-microvm-images", Method: "GET", Path: "/2025-09-09/managed-microvm-images",
		Help: "List the managed base images", Params: []Param{maxRes, nextTok}},
	{Name: "ListManagedMicrovmImageVersions", Command: "list-managed-microvm-image-versions", Method: "GET", Path: "/2025-09-09/managed-microvm-images/{imageIdentifier}/versions",
		Help: "List a managed base image's versions", Params: []Param{p("imageIdentifier", String, Path, true, "ARN of the managed image"), maxRes, nextTok}},
	{Name: "RunMicrovm", Command: "run-microvm", Method: "POST", Path: "/2025-09-09/microvms", Wait: "microvm",
		Help: "Start a microVM from an image's snapshot", Params: []Param{
			p("imageIdentifier", String, Body, true, "name or ARN of the image"),
			p("imageVersion", String, Body, false, "version (default: the latest active one)"),
			p("ingressNetworkConnectors", StringList, Body, false, "ingress network connector ARNs"),
			p("egressNetworkConnectors", StringList, Body, false, "egress network connector ARNs"),
			p("executionRoleArn", String, Body, false, "IAM role ARN of the microVM"),
			p("idlePolicy", JSON, Body, false, `{"maxIdleDurationSeconds":60,"suspendedDurationSeconds":600,"autoResumeEnabled":true}`),
			p("logging", JSON, Body, false, `{"disabled":{}} or {"cloudWatch":{"logGroup":"..."}}`),
			p("runHookPayload", String, Body, false, "passed to the app's run hook"),
			p("maximumDurationInSeconds", Int, Body, false, "lifetime limit, at most 28800"),
			p("clientToken", String, Body, false, "idempotency token"),
		}},
	{Name: "GetMicrovm", Command: "get-microvm", Method: "GET", Path: "/2025-09-09/microvms/{microvmIdentifier}",
		Help: "Describe a microVM", Params: []Param{microvmID}},
	{Name: "ListMicrovms", Command: "list-microvms", Method: "GET", Path: "/2025-09-09/microvms",
		Help: "List microVMs", Params: []Param{maxRes, nextTok,
			p("imageIdentifier", String, Query, false, "only microVMs of this image"), p("imageVersion", String, Query, false, "only of this version")}},
	{Name: "SuspendMicrovm", Command: "suspend-microvm", Method: "POST", Path: "/2025-09-09/microvms/{microvmIdentifier}/suspend", Wait: "microvm",
		Help: "Suspend a running microVM (memory and disk kept)", Params: []Param{microvmID}},
	{Name: "ResumeMicrovm", Command: "resume-microvm", Method: "POST", Path: "/2025-09-09/microvms/{microvmIdentifier}/resume", Wait: "microvm",
		Help: "Resume a suspended microVM", Params: []Param{microvmID}},
	{Name: "TerminateMicrovm", Command: "terminate-microvm", Method: "DELETE", Path: "/2025-09-09/microvms/{microvmIdentifier}", Wait: "microvm",
		Help: "Terminate a microVM and free everything", Params: []Param{microvmID}},
	{Name: "CreateMicrovmAuthToken", Command: "create-microvm-auth-token", Method: "POST", Path: "/2025-09-09/microvms/{microvmIdentifier}/auth-token",
		Help: "Create a token for the microVM's endpoint (X-aws-proxy-auth header)", Params: []Param{microvmID,
			p("expirationInMinutes", Int, Body, true, "1 to 60"),
			p("allowedPorts", JSON, Body, true, `e.g. [{"port":8080}] or [{"allPorts":{}}]`)}},
	{Name: "CreateMicrovmShellAuthToken", Command: "create-microvm-shell-auth-token", Method: "POST", Path: "/2025-09-09/microvms/{microvmIdentifier}/shell-auth-token",
		Help: "Create a shell token for the microVM", Params: []Param{microvmID, p("expirationInMinutes", Int, Body, true, "1 to 60")}},
	{Name: "TagResource", Command: "tag-resource", Method: "POST", Path: "/2017-03-31/tags/{Resource}",
		Help: "Add tags to a microVM or image", Params: []Param{resARN, p("Tags", JSON, Body, true, `e.g. {"team":"a"}`)}},
	{Name: "UntagResource", Command: "untag-resource", Method: "DELETE", Path: "/2017-03-31/tags/{Resource}",
		Help: "Remove tags", Params: []Param{resARN, p("tagKeys", StringList, Query, true, "keys to remove")}},
	{Name: "ListTags", Command: "list-tags", Method: "GET", Path: "/2017-03-31/tags/{Resource}",
		Help: "List a resource's tags", Params: []Param{resARN}},
}
