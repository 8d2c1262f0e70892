package api

import (
	"fmt"
	"strings"
)

// InternetEgressConnector is the one egress network connector kiln
// offers: the AWS-managed public-internet egress, which kiln implements as
// NAT through the host behind its deny list (internal/egress).
const InternetEgressConnector = "aws-network-connector:INTERNET_EGRESS"

// AllIngressConnector is the AWS-managed ingress connector that opens a
// microVM's endpoint ports.
const AllIngressConnector = "aws-network-connector:ALL_INGRESS"

// validateEgressConnectors checks the egress connector ARNs' shape and
// then that kiln can honour each. AWS also accepts customer (VPC) egress
// connectors of the caller's account; kiln has no VPCs, and accepting such
// an ARN would leave the VM without the network its owner asked for,
// silently. So anything but INTERNET_EGRESS is refused with the list of
// what is available (docs/COMPATIBILITY.md, "Networking").
func (s *Server) validateEgressConnectors(field string, list []string) error {
	if err := validateConnectors(field, list); err != nil {
		return err
	}
	for i, a := range list {
		if !isManagedConnector(a, InternetEgressConnector) {
			return fieldError(fmt.Sprintf("%s.%d", field, i+1), a, fmt.Sprintf(
				"Member must be an egress network connector this server offers: arn:aws:lambda:%s:aws:network-connector:%s (customer VPC egress connectors are not available in kiln)",
				s.cfg.Region, InternetEgressConnector))
		}
	}
	return nil
}

// isManagedConnector reports whether arn names the AWS-managed connector
// name (account "aws"), in any partition and region.
func isManagedConnector(arn, name string) bool {
	parts := strings.SplitN(arn, ":", 7)
	return len(parts) == 7 && parts[4] == "aws" && parts[5] == "network-connector" && parts[6] == name
}

// defaultEgress is the egress of a microVM that names none.
func (s *Server) defaultEgress() []string {
	if !s.cfg.DefaultInternetEgress {
		return nil
	}
	return []string{fmt.Sprintf("arn:aws:lambda:%s:aws:network-connector:%s", s.cfg.Region, InternetEgressConnector)}
}
